"""Student evaluation: accuracy / macro-F1 from cache rows, size, CPU latency, the result table."""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.io import atomic_write_bytes, atomic_write_text
from data.metrics import classification_metrics
from trainer.loader import CacheStream, StreamConfig, WordIds, to_device


PREDICTIONS = "test_predictions.parquet"  # in a run folder: every test row's prediction


@torch.no_grad()
def evaluate(model, cache_dir, sets, fields, encode, num_labels: int, device, batch_size: int = 256,
             predictions: Path | None = None) -> dict:
    """Metrics on labelled rows of `sets`, plus agreement with the teacher's argmax; `predictions`: also write
    every row's prediction there (Parquet: row_id, label (-1: none), prediction, teacher), which paired
    comparisons of two students on the same rows need (recipes/compare.py)."""
    model.eval()
    stream = CacheStream(cache_dir, sets, fields, StreamConfig(batch_size=batch_size, shuffle=False), encode=encode)
    preds, labels, teacher, row_ids = [], [], [], []
    for batch in stream:
        out = model(to_device(batch, device))
        preds.append(out.logits.argmax(-1).cpu().numpy())
        labels.append(batch["labels"].numpy())
        teacher.append(batch["teacher_logits"].argmax(-1).numpy())
        row_ids += batch["row_id"]
    preds, labels, teacher = (np.concatenate(x) for x in (preds, labels, teacher))
    keep = labels >= 0
    metrics = classification_metrics(preds[keep], labels[keep], num_labels)
    metrics["teacher_agreement"] = float(np.mean(preds == teacher))
    metrics["teacher_accuracy"] = float(np.mean(teacher[keep] == labels[keep])) if keep.any() else float("nan")
    if predictions is not None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"row_id": row_ids, "label": labels, "prediction": preds, "teacher": teacher}), sink)
        atomic_write_bytes(predictions, sink.getvalue().to_pybytes())
    return metrics


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@torch.no_grad()
def cpu_latency_ms(model, texts: list[str], batch_size: int, repeats: int = 3) -> float:
    """Milliseconds per sentence for raw text -> logits (tokenisation included), best of `repeats`."""
    model = model.cpu().eval()
    texts = (texts * (batch_size // max(1, len(texts)) + 1))[: max(batch_size, min(len(texts), 256))]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            model(model.encode_texts(texts[i : i + batch_size]))
        best = min(best, (time.perf_counter() - t0) / len(texts))
    return best * 1000


COLUMNS = [("run", "run", ""), ("student", "student", ""), ("loss", "loss", ""),
           ("dev acc", "dev_accuracy", ".4f"), ("dev F1", "dev_macro_f1", ".4f"),
           ("test acc", "test_accuracy", ".4f"), ("vs ce", "vs_ce", "+.4f"), ("test F1", "test_macro_f1", ".4f"),
           ("params", "params", ","), ("disk MB", "disk_mb", ".2f"), ("ms/sent b1", "latency_b1_ms", ".3f"),
           ("ms/sent b64", "latency_b64_ms", ".3f"), ("s/epoch", "epoch_seconds", ".1f"),
           ("train s", "train_seconds", ".1f")]


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows under (header, key, format spec) columns; a spec formats a right-aligned number, "" a text.
    A missing, None or NaN value is an empty cell."""
    def cell(v, spec: str) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return format(v, spec) if spec else str(v)

    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---:" if spec else "---" for _, _, spec in columns) + "|"
    lines = ["| " + " | ".join(cell(r.get(k), spec) for _, k, spec in columns) + " |" for r in rows]
    return "\n".join([head, sep, *lines])


def result_table(results: list[dict]) -> str:
    """The runs, one line each, under the teacher's line (test accuracy from the cache);
    "vs ce" is each distilled run's test accuracy minus its plain `ce` twin's."""
    teacher = next((r["teacher_test_accuracy"] for r in results if r.get("teacher_test_accuracy") is not None), None)
    rows = ([{"run": "teacher (cached logits)", "test_accuracy": teacher}] if teacher is not None else []) + results
    return markdown_table(rows, COLUMNS)


def write_csv(path: Path, history: list[dict]) -> None:
    keys = sorted({k for h in history for k in h})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def finish_run(run, cfg, cache, out: Path, best: dict, seconds: float, history: list[dict], device,
               words: WordIds | None = None) -> dict:
    """Reload the best student as a user would and measure it on the test rows (with the run's own `words`
    table when it has one: the reloaded vocabulary is the one it was built from)."""
    from trainer.students import cached_inputs, load_student, text_encoder

    model = load_student(out / "best", device=str(device))
    encode = words if isinstance(words, WordIds) else text_encoder(model, cache, [cfg.test_set])
    test = evaluate(model, cfg.cache, [cfg.test_set], cached_inputs(model), encode, cache.num_labels, device,
                    predictions=out / PREDICTIONS)
    result = {"run": run.name, "student": run.student, "loss": run.loss, "folder": str(out),
              "dev_accuracy": best["dev_accuracy"], "dev_macro_f1": best["dev_macro_f1"],
              "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
              "teacher_test_accuracy": test["teacher_accuracy"], "test_teacher_agreement": test["teacher_agreement"],
              "params": count_parameters(model), "disk_mb": size_on_disk(out / "best") / 1e6,
              "train_seconds": round(seconds, 1),
              "epoch_seconds": round(float(np.mean([h["epoch_seconds"] for h in history])), 2) if history else None}
    if cfg.measure_latency:
        texts = cache.row_table([cfg.test_set], ["text"]).column("text").to_pylist()[:256]
        result["latency_b1_ms"] = cpu_latency_ms(model, texts[:64], 1)
        result["latency_b64_ms"] = cpu_latency_ms(model, texts, 64)
    atomic_write_text(out / "result.json", json.dumps(result, indent=2))
    return result
