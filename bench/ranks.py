"""Caching with 1 rank vs N ranks under torchrun, side by side, and the equality of the two caches.

Each run is `torchrun --nproc_per_node=N -m pipeline.teacher_cache` over the same rows and
config (one torch thread per rank, so N ranks use N cores). Reports rows/s of the whole
job (launch to merged manifest, the teacher load included, as a user sees it) and checks
that the N-rank cache holds the same shards, row ids and values as the 1-rank one.
Writes bench/results/ranks.json.

    python bench/ranks.py [rows=2000] [ranks=2] [config=configs/cpu-layers.yaml] [key=value ...]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.io import atomic_write_text  # noqa: E402
from pipeline.cache_reader import TeacherCache  # noqa: E402

FIELDS = ("logits", "cls", "hidden", "attention")


def run_cache(ranks: int, config: str, root: Path, rows: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "-m", "pipeline.teacher_cache",
           "--config", config, f"cache.root={root}", "cache.name=bench", f"cache.max_rows={rows}", "cache.shard_rows=256",
           *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    return seconds


def compare(a_dir: Path, b_dir: Path) -> dict:
    """Shard names, row ids per shard and values: exact for row ids, max abs difference for values."""
    a, b = TeacherCache(a_dir), TeacherCache(b_dir)
    lay = a.layout
    fields = ["logits"] + [f for f, on in (("cls", lay.cls_layers), ("hidden", lay.hidden_layers),
                                           ("attention", lay.attention_layers)) if on]
    sa, sb = {s.name: s for s in a.shards()}, {s.name: s for s in b.shards()}
    out = {"same_shards": sorted(sa) == sorted(sb), "rows": sum(s.rows for s in sa.values()),
           "same_row_ids": True, "max_abs_diff": {}}
    for name in sorted(set(sa) & set(sb)):
        x = a.reader(name).read(0, sa[name].rows, fields)
        y = b.reader(name).read(0, sb[name].rows, fields)
        out["same_row_ids"] &= x["row_id"] == y["row_id"]
        for f in fields:
            if f not in x:
                continue
            xs = x[f] if isinstance(x[f], list) else [x[f]]
            ys = y[f] if isinstance(y[f], list) else [y[f]]
            d = max((float(np.max(np.abs(p.astype(np.float32) - q.astype(np.float32)))) if p.size else 0.0)
                    for p, q in zip(xs, ys))
            out["max_abs_diff"][f] = max(out["max_abs_diff"].get(f, 0.0), d)
    return out


def main(argv: list[str]) -> None:
    own = ("rows", "ranks", "config")
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in own)
    extra = [a for a in argv if a.split("=", 1)[0] not in own]
    rows, ranks = int(opts.get("rows", 2000)), int(opts.get("ranks", 2))
    config = opts.get("config", "configs/cpu-layers.yaml")
    # the teacher and the data split exist before timing (fine-tuned once by the config's own run)
    subprocess.run([sys.executable, "-m", "pipeline.teacher_cache", "--config", config, "cache.max_rows=8",
                    f"cache.root={tempfile.mkdtemp()}", *extra], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    with tempfile.TemporaryDirectory() as tmp:
        one = run_cache(1, config, Path(tmp) / "one", rows, extra)
        many = run_cache(ranks, config, Path(tmp) / "many", rows, extra)
        cached = TeacherCache(Path(tmp) / "one" / "bench")
        n = len(cached)
        results = {"config": config, "rows_cached": n, "torch_threads_per_rank": 1, "cpus": os.cpu_count(),
                   "one_rank_seconds": round(one, 1), "one_rank_rows_s": round(n / one, 1),
                   f"{ranks}_ranks_seconds": round(many, 1), f"{ranks}_ranks_rows_s": round(n / many, 1),
                   "speedup": round(one / many, 2),
                   "equality": compare(Path(tmp) / "one" / "bench", Path(tmp) / "many" / "bench")}
    out = REPO / "bench" / "results" / "ranks.json"
    atomic_write_text(out, json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
