"""A trained student as one file that maps token ids to logits, to serve without this project (onnxruntime, or
libtorch / torch.jit.load):

    python -m trainer.export RUN_DIR --format onnx|torchscript [--int8] [--out DIR] [--texts FILE] [--cache DIR]

The folder written (default `<run>/export-<format>`) holds model.onnx or model.pt (+ model.int8.* with --int8),
the student's vocabulary or tokenizer files and export.json: inputs, outputs, label names, how to tokenise,
and the check this command ran. The check runs the exported model and the eager student on the run's test rows
(the cache named in `<out_dir>/config.json`, or `--cache`, or a `--texts` file) and reports max |Δlogit| and the
accuracy of each: over 1e-4 in fp32 is exit 2 and nothing is written. int8 (dynamic quantisation of Linear and
LSTM weights) reports its accuracy change instead.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.io import CliParser, UserError, atomic_replace_dir, atomic_write_text, check_output_dir, run_cli
from trainer.evaluate import markdown_table
from trainer.students import META, WEIGHTS, BiLSTMStudent, TextCNNStudent, load_student
from trainer.students._word import WordStudent
from trainer.vocab import _TOKEN_RE, MASK, Vocab

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
TOLERANCE = 1e-4  # fp32 max |Δlogit| allowed between the exported model and the eager student
OPSET = 17
EXAMPLE = ["a short one", "and a longer sentence, so the traced example has padding"]  # padding: no mask shortcut
_FORMAT = "distil-cache-export/1"


@dataclass
class Rows:
    """What the check runs on: texts (pairs: texts_b), gold label ids (None: unlabelled) and where from."""

    texts: list[str]
    texts_b: list[str] | None
    labels: list[int | None]
    source: str


def input_names(student: nn.Module, pair: bool) -> list[str]:
    """The exported inputs, in order: the tensors encode_texts gives (word ids + lengths, or WordPiece ids +
    attention mask); token_type_ids only for pairs (all zeros otherwise, BERT's default)."""
    batch = student.encode_texts(EXAMPLE, EXAMPLE[::-1] if pair else None)
    return [k for k, v in batch.items() if torch.is_tensor(v) and (pair or k != "token_type_ids")]


class Exportable(nn.Module):
    """Positional id tensors -> the student's batch dict -> logits: tracers take tensors, not dicts."""

    def __init__(self, student: nn.Module, names: list[str]):
        super().__init__()
        self.student, self.names = student, tuple(names)
        # TextCNN pads inputs shorter than its widest filter with a Python `if` a trace would freeze; padding
        # here keeps every input past that branch, and trailing <pad> windows are masked, so logits are equal
        self.pad = max(student.config.widths) - 1 if isinstance(student, TextCNNStudent) else 0
        # BiLSTM pooling="last" leaves the LSTM's packed outputs unused, and the ONNX exporter fails on an unused
        # packed output: forward unpacks them (want=hidden) and adds 0 × their sum (finite: the logits are equal)
        last = isinstance(student, BiLSTMStudent) and student.config.pooling == "last"
        self.want = frozenset({"hidden"}) if last else frozenset()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        batch = dict(zip(self.names, inputs))
        if self.pad:
            batch.update({k: F.pad(v, (0, self.pad)) for k, v in batch.items() if k.startswith("word_ids")})
        out = self.student(batch, self.want)
        return out.logits + 0 * out.hidden_states[-1].sum() if self.want else out.logits


class _ZeroState(nn.Module):
    """A dynamically quantised LSTM sizes its zero initial state with a Python int, which tracing freezes to
    the example's batch size; this passes the same zeros sized from the packed batch as a traced op."""

    def __init__(self, lstm: nn.Module):
        super().__init__()
        self.lstm = lstm

    def forward(self, packed):
        n = self.lstm.num_layers * (2 if self.lstm.bidirectional else 1)
        h = torch.zeros(n, packed.batch_sizes[0], self.lstm.hidden_size, dtype=packed.data.dtype)
        return self.lstm(packed, (h, h))


def quantized(module: Exportable) -> nn.Module:
    """int8 dynamic quantisation of Linear and LSTM weights (activations quantised on the fly), on a copy."""
    from torch.ao.nn.quantized.dynamic import LSTM as QLSTM

    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {nn.Linear, nn.LSTM}, dtype=torch.qint8)
    for parent in list(q.modules()):
        for name, child in parent.named_children():
            if isinstance(child, QLSTM):
                setattr(parent, name, _ZeroState(child))
    return q


@contextlib.contextmanager
def _quiet():
    """The tracers' warnings (Python and C++ on fd 2) are about shapes the check below verifies anyway."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def write_model(fmt: str, module: nn.Module, example: tuple, names: list[str], path: Path) -> None:
    with _quiet(), torch.no_grad():
        if fmt == "torchscript":
            torch.jit.trace(module, example, check_trace=False).save(str(path))
            return
        # the TorchScript-based exporter: torch.export (dynamo=True) cannot capture pack_padded_sequence, whose
        # sizes depend on the lengths' values; this one maps it onto ONNX LSTM's sequence_lens
        axes = {n: {0: "batch", 1: "length_b" if n.endswith("_b") else "length"} for n in names
                if "lengths" not in n}
        axes.update({n: {0: "batch"} for n in names if "lengths" in n}, logits={0: "batch"})
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["logits"], dynamic_axes=axes)


def quantize_onnx(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic int8 of the MatMul (Linear) and LSTM weights, activations quantised on the fly."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    _gemm_as_matmul(model.graph)
    with _quiet():
        quantize_dynamic(model, str(dst), op_types_to_quantize=["MatMul", "LSTM"], weight_type=QuantType.QInt8)


def _gemm_as_matmul(graph) -> None:
    """A Linear on 2-D inputs (the word students' heads, BERT's pooler and classifier) exports as Gemm, which
    the dynamic quantiser leaves in fp32: rewrite each as MatMul (+ Add of the bias), as torch quantises it."""
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in weights or a.get("transA", 0)
                or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        graph.initializer.append(numpy_helper.from_array(w.T.copy() if a.get("transB", 0) else w, f"{node.name}.w"))
        bias = len(node.input) > 2 and node.input[2]
        mid = f"{node.name}.mm" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], f"{node.name}.w"], [mid], name=f"{node.name}.mm"))
        if bias:
            nodes.append(helper.make_node("Add", [mid, node.input[2]], [node.output[0]], name=f"{node.name}.add"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def runner(fmt: str, path: Path, names: list[str], threads: int = 0):
    """tensors -> logits (numpy) with the exported file, as a user would load it (onnxruntime: `threads` intra-op
    threads, 0 = its default; TorchScript follows torch.set_num_threads)."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1 if threads else 0
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda xs: session.run(["logits"], {n: x.numpy() for n, x in zip(names, xs)})[0]
    with warnings.catch_warnings():  # torch.jit's deprecation notice: loading it is what a user would do
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(path))
    return lambda xs: model(*xs).numpy()


def rows_from_texts(path: Path) -> Rows:
    """One text per line, or a pair per line with a tab between the sentences; no labels."""
    if not path.is_file():
        raise UserError(f"--texts {path}: no such file")
    parts = [l.split("\t", 1) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not parts:
        raise UserError(f"--texts {path}: no texts in it")
    pairs = {len(p) == 2 for p in parts}
    if len(pairs) > 1:
        raise UserError(f"--texts {path}: some lines are pairs (a tab) and some are not")
    return Rows([p[0] for p in parts], [p[1] for p in parts] if pairs == {True} else None, [None] * len(parts),
                f"texts {path}")


def run_settings(run_dir: Path) -> dict:
    """The TrainConfig trainer.train saved beside the run (config.json in its out_dir); {} when there is none."""
    config = run_dir.parent / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def rows_from_cache(run_dir: Path, cache: str | None) -> Rows:
    """The test rows of the run's cache: `--cache`, else the one in the config.json trainer.train wrote into
    the run's out_dir (a note when that cache is not the one the run trained on)."""
    from pipeline.cache_sync import open_cache
    from trainer.run_key import KEY_FILE, cache_fingerprint

    settings = run_settings(run_dir)
    cache = cache or settings.get("cache")
    if not cache:
        raise UserError(f"{run_dir}: no {run_dir.parent / 'config.json'} names its cache; pass --cache DIR or "
                        "--texts FILE")
    test_set = settings.get("test_set", "test")
    c = open_cache(cache)
    key = run_dir / KEY_FILE
    if key.is_file() and json.loads(key.read_text()).get("values", {}).get("cache") != cache_fingerprint(c):
        print(f"note: {cache} is not the cache {run_dir.name} trained on: its test rows may be other rows")
    t = c.row_table([test_set], ["text", "text_b", "label"])
    b = t.column("text_b").to_pylist()
    return Rows(t.column("text").to_pylist(), [x or "" for x in b] if any(b) else None, t.column("label").to_pylist(),
                f"cache {cache}, set {test_set}")


def _batches(n: int, size: int = 64) -> list[slice]:
    """One row first, then `size` at a time: the check covers batch 1, full batches and a remainder."""
    cuts = [0, min(1, n)] + list(range(1 + size, n, size)) + [n]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


@torch.no_grad()
def all_logits(run, student, names: list[str], rows: Rows) -> np.ndarray:
    """Logits of `run` (tensors -> numpy) over the rows, encoded by the student's own encoder."""
    return np.concatenate([np.asarray(run(encode(student, names, rows.texts[s], rows.texts_b and rows.texts_b[s])),
                                      dtype=np.float32) for s in _batches(len(rows.texts))])


def encode(student, names: list[str], texts: list[str], texts_b: list[str] | None = None) -> tuple:
    """Text -> the exported inputs, by the student's own encoder (what a user must reproduce)."""
    batch = student.encode_texts(texts, texts_b)
    return tuple(batch[n] for n in names)


def compare(name: str, file: str | None, logits: np.ndarray, eager: np.ndarray, labels: np.ndarray) -> dict:
    keep = labels >= 0
    pred = logits.argmax(-1)
    return {"model": name, "file": file, "max_abs_logit_diff": float(np.abs(logits - eager).max()),
            "agreement": float(np.mean(pred == eager.argmax(-1))),
            "accuracy": float(np.mean(pred[keep] == labels[keep])) if keep.any() else None}


COLUMNS = [("model", "model", ""), ("file", "file", ""), ("MB", "mb", ".2f"),
           ("max abs Δlogit vs eager", "max_abs_logit_diff", ".1e"), ("argmax = eager", "agreement", ".4f"),
           ("accuracy", "accuracy", ".4f"), ("Δacc vs fp32", "accuracy_change", "+.4f")]


def resolve_run(path: str) -> tuple[Path, Path]:
    """(run folder, its best/ student folder) from either of them."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: no such run folder")
    for run, best in ((p, p / "best"), (p.parent, p)):
        if (best / META).is_file():
            return run, best
    raise UserError(f"{p}: not a trained run (no best/{META}; python -m trainer.train writes one)")


def export(run_path: str, fmt: str, int8: bool = False, out: str | None = None, texts: str | None = None,
           cache: str | None = None) -> dict:
    """Write the export folder and return export.json's content; UserError when the fp32 check fails."""
    if fmt == "onnx" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        raise UserError("ONNX export needs onnx and onnxruntime: pip install -e '.[export]'")
    run_dir, best = resolve_run(run_path)
    student = load_student(best)
    rows = rows_from_texts(Path(texts)) if texts else rows_from_cache(run_dir, cache)
    pair = getattr(student.config, "pair", rows.texts_b is not None)  # word students are built for one or the other
    if pair != (rows.texts_b is not None) and (pair or texts):  # a word student trained on pairs' first texts: fine
        raise UserError(f"{run_dir.name} reads {'sentence pairs' if pair else 'single sentences'}, but {rows.source} "
                        f"holds {'single sentences' if pair else 'pairs'}")
    rows.texts_b = rows.texts_b if pair else None
    names = input_names(student, pair)
    final = Path(out) if out else run_dir / f"export-{fmt}"
    check_output_dir(final, "--out")
    if final.is_dir() and any(final.iterdir()) and not (final / "export.json").is_file():
        raise UserError(f"--out {final}: a folder that is not an earlier export; choose a new or empty one")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        example = encode(student, names, EXAMPLE, EXAMPLE[::-1] if pair else None)
        files = write_models(fmt, Exportable(student, names).eval(), example, names, int8, tmp)
        results = check(run_dir.name, fmt, student, names, rows, {k: tmp / f for k, f in files.items()})
        info = {"format": _FORMAT, "exporter": fmt, "files": files, "run": str(run_dir), "student": student.kind,
                "inputs": _inputs(names), "outputs": [{"name": "logits", "dtype": "float32",
                                                       "shape": ["batch", len(student.label_names or [])]}],
                "label_names": student.label_names, "tokenizer": _tokenizer(student, best, tmp),
                "check": {"rows": len(rows.texts), "source": rows.source, "tolerance": TOLERANCE, "results": results}}
        atomic_write_text(tmp / "export.json", json.dumps(info, indent=1, ensure_ascii=False))
        atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "folder": str(final)}


def write_models(fmt: str, module: Exportable, example: tuple, names: list[str], int8: bool,
                 folder: Path) -> dict[str, str]:
    """The fp32 file (+ int8) traced on `example`; returns {"fp32": file name, "int8": ...}."""
    files = {"fp32": FORMATS[fmt]}
    write_model(fmt, module, example, names, folder / files["fp32"])
    if int8:
        files["int8"] = FORMATS[fmt].replace(".", ".int8.")
        if fmt == "onnx":
            quantize_onnx(folder / files["fp32"], folder / files["int8"])
        else:
            write_model(fmt, quantized(module), example, names, folder / files["int8"])
    return files


def check(run: str, fmt: str, student, names: list[str], rows: Rows, paths: dict[str, Path]) -> list[dict]:
    """Each exported file against the eager student on the rows: prints the table; UserError past TOLERANCE."""
    labels = np.array([-1 if y is None else y for y in rows.labels])
    eager = all_logits(lambda xs: student(dict(zip(names, xs))).logits.numpy(), student, names, rows)
    results = [compare("eager", None, eager, eager, labels)]
    for kind, path in paths.items():
        logits = all_logits(runner(fmt, path, names), student, names, rows)
        results.append({**compare(f"{fmt} {kind}", path.name, logits, eager, labels), "mb": path.stat().st_size / 1e6})
    fp32 = results[1]
    if len(results) > 2 and fp32["accuracy"] is not None:
        results[2]["accuracy_change"] = results[2]["accuracy"] - fp32["accuracy"]
    print(f"{run}: {fmt} export checked on {len(rows.texts)} rows ({rows.source})")
    print(markdown_table(results, COLUMNS))
    if not fp32["max_abs_logit_diff"] <= TOLERANCE:
        raise UserError(f"run {run}: {fmt} logits differ from the eager student's by up to "
                        f"{fp32['max_abs_logit_diff']:.2e} (> {TOLERANCE:.0e}); nothing written")
    return results


_MEANING = {"word_ids": "vocabulary ids, right-padded with 0 (<pad>)", "word_lengths": "words per row (>= 1)",
            "input_ids": "WordPiece ids from the tokenizer, right-padded", "attention_mask": "1 = token, 0 = padding",
            "token_type_ids": "0 = first sentence, 1 = second"}


def _inputs(names: list[str]) -> list[dict]:
    return [{"name": n, "dtype": "int64", "shape": ["batch"] if "lengths" in n else
             ["batch", "length_b" if n.endswith("_b") else "length"],
             "meaning": _MEANING.get(n.removesuffix("_b"), "") + (" (second sentence)" if n.endswith("_b") else "")}
            for n in names]


def _tokenizer(student, best: Path, folder: Path) -> dict:
    """Copy the text encoder (every file of best/ but the weights and student.json) beside the model and say
    how to run it, so the folder travels alone."""
    files = sorted(f.name for f in best.iterdir() if f.is_file() and f.name not in (WEIGHTS, META))
    for name in files:
        shutil.copy2(best / name, folder / name)
    if isinstance(student, WordStudent):
        return {"kind": "words", "files": files, "vocab": "itos: id -> word", "lowercase": True,
                "pattern": _TOKEN_RE.pattern, "pattern_flags": "VERBOSE (Python re.X)",
                "rules": f"lower-case; tokens are the pattern's matches in order; '[mask]' reads {MASK}; a word not "
                         f"in the vocabulary is id {Vocab.unk_id}; an empty text is one <unk>; pad id {Vocab.pad_id}",
                "max_len": student.config.max_len}
    if getattr(student, "tokenizer", None) is not None:  # a Hugging Face tokenizer saved with the student
        return {"kind": "huggingface", "files": files,
                "load": "transformers.AutoTokenizer.from_pretrained(<this folder>)",
                "call": {"padding": True, "truncation": True, "max_length": student.config.max_length}}
    return {"kind": student.kind, "files": files, "load": "the student's encode_texts (trainer/students)"}


def main(argv: list[str]) -> int:
    p = CliParser(prog="python -m trainer.export", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a trained run folder (<out_dir>/<name>) or its best/ folder")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--int8", action="store_true", help="also write a dynamically quantised int8 model")
    p.add_argument("--out", metavar="DIR", help="output folder (default <run>/export-<format>)")
    p.add_argument("--texts", metavar="FILE", help="check on these texts (one per line, a tab before a pair's "
                                                   "second) instead of the run's test rows")
    p.add_argument("--cache", metavar="DIR", help="the cache whose test rows the check reads (default: the run's)")
    a = p.parse_args(argv)
    info = export(a.run_dir, a.format, a.int8, a.out, a.texts, a.cache)
    print(f"wrote {info['folder']}: {', '.join(info['files'].values())}, export.json")
    return 0


if __name__ == "__main__":
    run_cli(main)
