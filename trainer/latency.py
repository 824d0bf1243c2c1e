"""How much cheaper the student is: its CPU latency in every serving form, beside its teacher's, on this machine.

    python -m trainer.latency RUN_DIR [--teacher DIR] [--rows N] [--cache DIR | --texts FILE]

Eager PyTorch, TorchScript and ONNX (onnxruntime, when installed), each fp32 and dynamic int8, and the teacher
(its Hugging Face model, eager fp32) run over the same texts: batch 1 and 64, one thread and every core; ms per
sentence and sentences per second, the median of 3 passes after a warm-up pass. Model time only: each model's
inputs are tokenised beforehand, and the tokenisers' own ms per sentence are given beside. The teacher is the
folder `--teacher` names, else the cache's `teacher.path` when that folder is on this machine. Writes
<run>/latency.json and latency.md. `python -m trainer.export` checks that the exported files compute the
student's logits; this command only times them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from data.io import CliParser, UserError, atomic_write_text, quiet_transformers, run_cli
from trainer.evaluate import markdown_table
from trainer.export import (EXAMPLE, Exportable, Rows, encode, input_names, quantized, resolve_run, rows_from_cache,
                            rows_from_texts, run_settings, runner, write_models)
from trainer.students import load_student

BATCHES = (1, 64)
REPEATS = 3
COLUMNS = [("model", "model", ""), ("form", "form", ""), ("batch", "batch", "d"), ("threads", "threads", "d"),
           ("ms/sentence", "ms_per_sentence", ".3f"), ("sentences/s", "sentences_per_s", ",.0f"),
           ("× faster than teacher", "speedup", ",.1f")]


def seconds_per_sentence(fn, batches: list[tuple]) -> float:
    """Median over REPEATS passes of the batches (after one warm-up pass) of seconds per sentence."""
    with torch.inference_mode():
        for b in batches:
            fn(b)
        passes = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            passes.append(time.perf_counter() - t0)
    return statistics.median(passes) / sum(len(b[0]) for b in batches)


def rows_at(batch: int, rows: int) -> int:
    """Texts timed at a batch size: `rows`, at most 64 one by one (batch 1 is slow and steady)."""
    return rows if batch > 1 else min(rows, 64)


def batched(rows: Rows, size: int, limit: int, encode_batch) -> list[tuple]:
    """Encoded batches of `size` over the first `limit` texts (repeated when there are fewer)."""
    n = max(size, limit)
    texts = (rows.texts * (n // len(rows.texts) + 1))[:n]
    pairs = (rows.texts_b * (n // len(rows.texts_b) + 1))[:n] if rows.texts_b else None
    return [encode_batch(texts[i:i + size], pairs and pairs[i:i + size]) for i in range(0, n, size)]


def student_forms(student, names: list[str], pair: bool, folder: Path) -> dict[str, callable]:
    """form -> (threads -> tensors -> logits): eager, TorchScript and ONNX, fp32 and int8."""
    module = Exportable(student, names).eval()
    q = quantized(module)
    forms = {"eager fp32": lambda t: lambda xs: student(dict(zip(names, xs))).logits,
             "eager int8": lambda t: lambda xs: q(*xs)}
    example = encode(student, names, EXAMPLE, EXAMPLE[::-1] if pair else None)
    onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
    for fmt in ("torchscript", "onnx") if onnx else ("torchscript",):
        files = write_models(fmt, module, example, names, True, folder)
        for kind, file in files.items():
            forms[f"{fmt} {kind}"] = lambda t, fmt=fmt, path=folder / file: runner(fmt, path, names, t)
    return forms


def teacher_form(folder: Path, max_length: int):
    """(tokeniser (texts, pairs) -> inputs, threads -> inputs -> logits) of the teacher folder's HF model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    except OSError as e:
        raise UserError(f"--teacher {folder}: not a Hugging Face model folder ({str(e).splitlines()[0]})") from None
    keys = ["input_ids", "attention_mask", "token_type_ids"]

    def tokenise(texts, pairs):
        batch = tok(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return tuple(batch[k] for k in keys if k in batch)

    return tokenise, lambda t: lambda xs: model(**dict(zip(keys, xs))).logits


def find_teacher(run_dir: Path, given: str | None, cache: str | None) -> tuple[Path | None, int]:
    """The teacher folder (--teacher, else the manifest's teacher.path of --cache or the run's cache, if that
    folder is here) and the cache's max_length, the teacher's truncation (512 without a manifest)."""
    from pipeline.cache_schema import Manifest

    cache = cache or run_settings(run_dir).get("cache")
    manifest = Manifest.load(Path(cache)) if cache and (Path(cache) / "manifest.json").is_file() else None
    folder = Path(given) if given else Path(manifest.teacher.path) if manifest else None
    if given and not folder.is_dir():
        raise UserError(f"--teacher {given}: no such folder")
    return (folder if folder and folder.is_dir() else None), (manifest.max_length if manifest else 512)


def measure(run_path: str, teacher: str | None = None, rows: int = 256, cache: str | None = None,
            texts: str | None = None) -> dict:
    run_dir, best = resolve_run(run_path)
    student = load_student(best)
    data = rows_from_texts(Path(texts)) if texts else rows_from_cache(run_dir, cache)
    pair = getattr(student.config, "pair", data.texts_b is not None)
    data.texts_b = data.texts_b if pair else None
    names = input_names(student, pair)
    teacher_dir, max_length = find_teacher(run_dir, teacher, cache)
    threads = sorted({1, os.cpu_count() or 1})
    saved_threads = torch.get_num_threads()
    results, tokenise_ms = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        models = [("student", lambda a, b: encode(student, names, a, b), student_forms(student, names, pair, Path(tmp)))]
        if teacher_dir is not None:
            tokenise, run_teacher = teacher_form(teacher_dir, max_length)
            models.append(("teacher", tokenise, {"eager fp32": run_teacher}))
        try:
            for who, tokenise, forms in models:
                t0 = time.perf_counter()
                inputs = {b: batched(data, b, rows_at(b, rows), tokenise) for b in BATCHES}
                n = sum(len(x[0]) for b in BATCHES for x in inputs[b])
                tokenise_ms[who] = 1000 * (time.perf_counter() - t0) / n
                for t in threads:
                    torch.set_num_threads(t)
                    for form, make in forms.items():
                        fn = make(t)
                        for b in BATCHES:
                            s = seconds_per_sentence(fn, inputs[b])
                            results.append({"model": who, "form": form, "batch": b, "threads": t,
                                            "ms_per_sentence": 1000 * s, "sentences_per_s": 1 / s})
        finally:
            torch.set_num_threads(saved_threads)
    base = {(r["batch"], r["threads"]): r["ms_per_sentence"] for r in results if r["model"] == "teacher"}
    for r in results:
        if (r["batch"], r["threads"]) in base:
            r["speedup"] = base[(r["batch"], r["threads"])] / r["ms_per_sentence"]
    info = {"run": str(run_dir), "student": student.kind, "teacher": str(teacher_dir) if teacher_dir else None,
            "texts": data.source, "rows": {b: max(b, rows_at(b, rows)) for b in BATCHES},
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "tokenise_ms_per_sentence": tokenise_ms,
            "results": results}
    atomic_write_text(run_dir / "latency.json", json.dumps(info, indent=1))
    atomic_write_text(run_dir / "latency.md", report(info))
    return info


def report(info: dict) -> str:
    tok = info["tokenise_ms_per_sentence"]
    lines = [f"CPU latency of {Path(info['run']).name} ({info['student']}) on {info['texts']}, "
             f"{info['cpu_count']} cores, torch {info['torch']}; model time only (inputs tokenised beforehand).",
             "Tokenising: " + ", ".join(f"{k} {v:.3f} ms/sentence" for k, v in tok.items()) + ".",
             "" if info["teacher"] else "No teacher folder on this machine (pass --teacher DIR): no teacher rows.",
             "", markdown_table(info["results"], COLUMNS)]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = CliParser(prog="python -m trainer.latency", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a trained run folder (<out_dir>/<name>) or its best/ folder")
    p.add_argument("--teacher", metavar="DIR", help="the teacher's model folder (default: the cache's teacher.path)")
    p.add_argument("--rows", type=int, default=256, metavar="N", help="texts timed at batch 64 (batch 1: up to 64)")
    p.add_argument("--cache", metavar="DIR", help="the cache whose test texts are timed (default: the run's)")
    p.add_argument("--texts", metavar="FILE", help="time these texts instead (one per line, a tab before a pair's "
                                                   "second)")
    a = p.parse_args(argv)
    if a.rows < 1:
        raise UserError(f"--rows {a.rows}: must be 1 or more")
    info = measure(a.run_dir, a.teacher, a.rows, a.cache, a.texts)
    print(report(info))
    print(f"wrote {Path(info['run']) / 'latency.json'} and latency.md")
    return 0


if __name__ == "__main__":
    run_cli(main)
