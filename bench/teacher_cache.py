"""Benchmark the caching pass against a bare teacher forward, side by side in one run.

Measures on the same model and rows:
  * bare forward (SDPA, bf16 on GPU), length-bucketed vs padded to max_length
  * the full caching pass storing logits + CLS, and with 4 attention layers (+ hidden, values)
  * bytes per row of the cache vs a naive fp32 dump padded to max_length of every layer
Writes bench/results/teacher_cache.json and prints it.

    python bench/teacher_cache.py [rows=1024] [config=configs/cpu.yaml] [out=FILE.json] [shard_rows=1024] [key=value ...]

Several shards per pass (shard_rows) so that writing shard k overlaps computing shard k+1, as in a real run.
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.config import load_config  # noqa: E402
from data.io import atomic_write_text  # noqa: E402
from data.prepare import load_split, prepare  # noqa: E402
from pipeline.run_config import RunConfig  # noqa: E402
from data.io import pick_device  # noqa: E402
from pipeline.teacher import is_finetuned, finetune, load_classifier  # noqa: E402
from pipeline.teacher_cache import build_cache, resolve_layout  # noqa: E402


def bare_forward(model, tokenizer, texts, max_length, batch_size, device, bucketed: bool) -> float:
    """Rows/s of logits only: sorted by length (padding within a batch) or padded to max_length."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable") if bucketed else np.arange(len(ids))
    pad = tokenizer.pad_token_id or 0
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(order), batch_size):
            chunk = [ids[j] for j in order[i : i + batch_size]]
            L = max(len(x) for x in chunk) if bucketed else max_length
            x = torch.full((len(chunk), L), pad)
            m = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, seq in enumerate(chunk):
                x[r, : len(seq)] = torch.tensor(seq)
                m[r, : len(seq)] = 1
            model(input_ids=x.to(device), attention_mask=m.to(device)).logits.float().cpu()
    _sync(device)
    return len(texts) / (time.perf_counter() - t0)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_bytes_per_row(cfg, max_length: int, num_labels: int) -> int:
    """fp32, padded to max_length, every hidden layer and every attention map."""
    n, d, h = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    return 4 * ((n + 1) * max_length * d + n * h * max_length * max_length + num_labels)


def cache_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())


def main(argv: list[str]) -> None:
    own = ("rows", "config", "out", "shard_rows")
    opts = dict(a.split("=", 1) for a in argv if "=" in a and a.split("=", 1)[0] in own)
    rest = [a for a in argv if a.split("=", 1)[0] not in own]
    rows = int(opts.get("rows", 1024))
    run = load_config(RunConfig, opts.get("config", REPO / "configs/cpu.yaml"), rest)
    if not is_finetuned(run.teacher.out_dir):  # timing only: a briefly fine-tuned teacher will do
        if not (Path(run.data.out_dir) / "meta.json").is_file():
            prepare(run.data)
        run.teacher.max_train_rows = run.teacher.max_train_rows or 256
        finetune(run.teacher, run.data.out_dir)
    device = pick_device(run.cache.device)
    model, tok = load_classifier(run.teacher.out_dir, 3)
    model.to(device).eval()
    texts = load_split(run.data.out_dir, "train").column("text").to_pylist()[:rows]
    bs, L = run.cache.batch_size, run.teacher.max_length
    for bucketed in (True, False):  # warm-up over every batch shape both passes will meet
        bare_forward(model, tok, texts, L, bs, device, bucketed)
    results = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "teacher": run.teacher.out_dir, "rows": len(texts), "batch_size": bs, "max_length": L}
    results["bare_bucketed_rows_s"] = bare_forward(model, tok, texts, L, bs, device, True)
    results["bare_padded_rows_s"] = bare_forward(model, tok, texts, L, bs, device, False)
    results["bucketing_speedup"] = results["bare_bucketed_rows_s"] / results["bare_padded_rows_s"]
    variants = {
        "logits_cls": {"cache.hidden_layers": "none", "cache.attention_layers": "none", "cache.store_values": False},
        "att4_hidden5_values": {"cache.hidden_layers": "auto", "cache.attention_layers": "auto",
                                "cache.store_values": True},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in variants.items():
            cfg = load_config(RunConfig, opts.get("config", REPO / "configs/cpu.yaml"), rest + [
                f"{k}={v}" for k, v in {**over, "cache.root": f"{tmp}/{name}", "cache.splits": "train",
                                        "cache.shard_rows": opts.get("shard_rows", 1024),
                                        "cache.max_rows": rows, "cache.augment_dir": f"{tmp}/none"}.items()])
            summary = build_cache(cfg)
            cache_dir = Path(summary["cache"])
            results[f"cache_{name}_rows_s"] = summary["rows_per_s"]
            results[f"cache_{name}_vs_bare"] = summary["rows_per_s"] / results["bare_bucketed_rows_s"]
            results[f"cache_{name}_bytes_per_row"] = cache_bytes(cache_dir) / summary["rows_written"]
            results[f"cache_{name}_write_mb_s"] = cache_bytes(cache_dir) / summary["seconds"] / 1e6
            results["layout_" + name] = str(resolve_layout(cfg.cache, model.config.num_hidden_layers))
    naive = naive_bytes_per_row(model.config, L, 3)
    results["naive_fp32_padded_bytes_per_row"] = naive
    results["bytes_ratio_naive_over_full_cache"] = naive / results["cache_att4_hidden5_values_bytes_per_row"]
    results["targets"] = {"cache_logits_cls_vs_bare": ">= 0.8 (GPU, MPNet)", "cache_att4_vs_bare": ">= 0.5 (GPU, MPNet)",
                          "bucketing_speedup": ">= 2", "bytes_ratio_naive_over_full_cache": ">= 20"}
    out = Path(opts.get("out") or REPO / "bench" / "results" / f"teacher_cache_{results['device'].split(':')[0]}.json")
    atomic_write_text(out, json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
