"""Crash harness: kill -9 the cache writer, the augmenter and a student run at random points,
resume each time, and compare with an uninterrupted run.

Kill points: the fault-injection points of the code (DISTIL_CRASH_AT=point:n, a real
SIGKILL: inside a shard commit, before a record, during the manifest's atomic rename, in
a training step) and plain timed SIGKILLs. Writes bench/results/faults.json.

    python bench/faults.py [trials=20] [student_trials=3] [augment_trials=3] [seed=0]
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
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

CACHE_POINTS = ["shard-arrow-written", "shard-zarr-written", "shard-zarr-renamed", "shard-files-in-place",
                "shard-recorded", "atomic-write-before-rename", "timed"]


def run(args: list[str], crash: str | None = None, kill_after: float | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DISTIL_CRASH_AT", None)
    if crash:
        env["DISTIL_CRASH_AT"] = crash
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    if proc.returncode not in (0, -9):
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {err[-2000:]}")
    return proc.returncode


def cache_rows(cache_dir: Path, sets=None) -> dict:
    cache = TeacherCache(cache_dir)
    rows, dup = {}, 0
    for s in cache.shards(sets):
        b = cache.reader(s).read(0, s.rows, ("logits", "hidden"))
        for rid, logits, hidden in zip(b["row_id"], b["logits"], b["hidden"]):
            dup += rid in rows
            rows[rid] = (logits, hidden)
    return {"rows": rows, "duplicated": dup}


def compare_caches(got: dict, want: dict) -> dict:
    lost = set(want["rows"]) - set(got["rows"])
    extra = set(got["rows"]) - set(want["rows"])
    differ = sum(1 for r in set(want["rows"]) & set(got["rows"])
                 if not (np.array_equal(got["rows"][r][0], want["rows"][r][0])
                         and np.array_equal(got["rows"][r][1], want["rows"][r][1])))
    return {"lost": len(lost), "extra": len(extra), "duplicated": got["duplicated"], "values_differ": differ}


def cache_trials(base: list[str], reference: Path, tmp: Path, trials: int, rng: random.Random,
                 sets=None) -> list[dict]:
    want = cache_rows(reference, sets)
    results = []
    for t in range(trials):
        point = CACHE_POINTS[t % len(CACHE_POINTS)]
        root = tmp / f"trial{t}"
        args = base + [f"cache.root={root}"]
        kills = 0
        for attempt in range(rng.randint(1, 3)):  # one to three crashes, then a clean finish
            if point == "timed":
                code = run(args, kill_after=rng.uniform(4.0, 9.0))
            else:
                code = run(args, crash=f"{point}:{rng.randint(1, 4)}")
            kills += code == -9
        assert run(args) == 0
        got = cache_rows(root / "c")
        results.append({"trial": t, "point": point, "kills": kills, **compare_caches(got, want)})
        print(results[-1], flush=True)
        shutil.rmtree(root)
    return results


def student_trials(cache_dir: Path, tmp: Path, trials: int, rng: random.Random) -> list[dict]:
    """A training run killed mid-epoch and resumed ends with the same weights as an uninterrupted one."""
    from safetensors.numpy import load_file

    base = ["trainer.train", f"cache={cache_dir}", "students=textcnn", "losses=hinton", "epochs=2",
            "checkpoint_every=2", "measure_latency=false", "patience=9", "train_sets=train"]
    run(base + [f"out_dir={tmp / 'ref'}"])
    want = load_file(str(tmp / "ref" / "textcnn-hinton" / "checkpoint-stage0" / "model.safetensors"))
    results = []
    for t in range(trials):
        out = tmp / f"student{t}"
        step = rng.randint(2, 7)  # the run has 8 steps (240 rows, batch 64, 2 epochs)
        code = run(base + [f"out_dir={out}"], crash=f"student-step:{step}")
        assert run(base + [f"out_dir={out}"]) == 0
        got = load_file(str(out / "textcnn-hinton" / "checkpoint-stage0" / "model.safetensors"))
        same = all(np.array_equal(got[k], want[k]) for k in want)
        results.append({"trial": t, "killed_at_step": step, "killed": code == -9, "identical_weights": same})
        print(results[-1], flush=True)
    return results


def augment_trials(data_dir: Path, tmp: Path, trials: int, rng: random.Random) -> list[dict]:
    """kill -9 `augment.run` (Tang rules) after its n-th committed part, resume with 2 workers: byte-identical."""
    base = ["augment.run", f"data_dir={data_dir}", "methods=tang", "seed=3", "chunk_rows=32", "progress=false"]
    run(base + ["workers=2", f"out_dir={tmp / 'aug-ref'}", f"cache_dir={tmp / 'aug-ref-cache'}"])
    want = (tmp / "aug-ref" / "tang.parquet").read_bytes()
    results = []
    for t in range(trials):
        out = [f"out_dir={tmp / f'aug{t}'}", f"cache_dir={tmp / f'aug{t}-cache'}"]
        n = rng.randint(1, 4)
        code = run(base + ["workers=1", *out], crash=f"augment-part-committed:{n}")
        assert run(base + ["workers=2", *out]) == 0
        results.append({"trial": t, "killed_after_part": n, "killed": code == -9,
                        "identical_bytes": (tmp / f"aug{t}" / "tang.parquet").read_bytes() == want})
        print(results[-1], flush=True)
    return results


def main(argv: list[str]) -> None:
    opts = {k: int(v) for k, v in (a.split("=", 1) for a in argv)}
    rng = random.Random(opts.get("seed", 0))
    sys.path.insert(0, str(REPO / "tests"))
    from tests.conftest import tiny_run_config
    from pipeline.teacher_cache import build_cache

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run_cfg = tiny_run_config(tmp / "ref", **{"cache.shard_rows": 16, "cache.name": "c"})
        t0 = time.time()
        build_cache(run_cfg)
        reference = Path(run_cfg.cache.root) / "c"
        base = ["pipeline.teacher_cache", f"data.out_dir={run_cfg.data.out_dir}",
                f"data.max_rows={run_cfg.data.max_rows}", f"teacher.out_dir={run_cfg.teacher.out_dir}",
                "teacher.max_length=48", "cache.shard_rows=16", "cache.batch_size=16", "cache.name=c",
                f"cache.augment_dir={tmp / 'none'}"]
        results = {"cache": cache_trials(base, reference, tmp, opts.get("trials", 20), rng),
                   "student": student_trials(reference, tmp, opts.get("student_trials", 3), rng),
                   "augment": augment_trials(Path(run_cfg.data.out_dir), tmp, opts.get("augment_trials", 3), rng)}
    c = results["cache"]
    results["summary"] = {
        "cache_runs": len(c), "cache_kills": sum(r["kills"] for r in c), "rows_lost": sum(r["lost"] for r in c),
        "rows_duplicated": sum(r["duplicated"] + r["extra"] for r in c),
        "values_differ": sum(r["values_differ"] for r in c),
        "student_runs": len(results["student"]),
        "student_identical": sum(r["identical_weights"] for r in results["student"]),
        "student_killed": sum(r["killed"] for r in results["student"]),
        "augment_runs": len(results["augment"]), "augment_killed": sum(r["killed"] for r in results["augment"]),
        "augment_identical": sum(r["identical_bytes"] for r in results["augment"]),
        "seconds": round(time.time() - t0, 1)}
    out = REPO / "bench" / "results" / "faults.json"
    atomic_write_text(out, json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
