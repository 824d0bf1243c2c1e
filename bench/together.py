"""K students in one pass over the cache vs the same K trained one by one (issue 12, item 3).

Side by side in one invocation, on the same cache, seed and budget, K BiLSTM/TextCNN variants:
  separate   one `python -m trainer.train` process per run (what a user scripting runs gets; process start,
             cache opening, vocabulary and word ids paid K times)
  one-by-one one process, `together=1` (the runs one after another)
  together   one process, `together=K` (one stream, every batch stepped by all K)
Every route must end with the same test accuracy per run (the trainer's promise); the bench checks it and
prints wall times and ratios. Results to bench/results/together.json and .md.

    python bench/together.py [cache=work/quality/cache/minilm-tweets] [steps=150] [epochs=1] [threads=2]
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data.io import atomic_write_text  # noqa: E402

VARIANTS = [{"student": "bilstm", "loss": "hinton"},
            {"student": "bilstm", "loss": "tang_mse"},
            {"student": "bilstm", "loss": "hinton", "name": "bilstm-hinton-h300", "student_params": {"hidden_size": 300}},
            {"student": "bilstm", "loss": "hinton", "name": "bilstm-hinton-t4", "loss_params": {"t": 4.0}},
            {"student": "textcnn", "loss": "hinton"},
            {"student": "textcnn", "loss": "tang_mse"},
            {"student": "textcnn", "loss": "tang_mse", "name": "textcnn-tang_mse-f200", "student_params": {"num_filters": 200}},
            {"student": "textcnn", "loss": "hinton", "name": "textcnn-hinton-lr2e-3", "lr": 2e-3}]


def train(out: Path, runs: list[dict], opts: dict, together: int) -> float:
    args = [sys.executable, "-m", "trainer.train", f"cache={opts['cache']}", f"out_dir={out}",
            f"runs={json.dumps(runs)}", f"epochs={opts['epochs']}", f"max_steps_per_epoch={opts['steps']}",
            "baseline=false", "measure_latency=false", "checkpoint_every=0", "tensorboard=false",
            f"together={together}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts["threads"]), "MKL_NUM_THREADS": str(opts["threads"])}
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def accuracies(out: Path) -> dict:
    return {json.loads(p.read_text())["run"]: json.loads(p.read_text())["test_accuracy"]
            for p in sorted(out.glob("*/result.json"))}


def main(argv: list[str]) -> None:
    opts = {"cache": "work/quality/cache/minilm-tweets", "steps": "150", "epochs": "1", "threads": "2",
            "work": "work/bench/together", "out": "bench/results/together.json"}
    opts.update(a.split("=", 1) for a in argv)
    work = ROOT / opts["work"]
    shutil.rmtree(work, ignore_errors=True)
    k = len(VARIANTS)
    separate = sum(train(work / "separate", [v], opts, 1) for v in VARIANTS)
    one_by_one = train(work / "one-by-one", VARIANTS, opts, 1)
    together = train(work / "together", VARIANTS, opts, k)
    acc = {route: accuracies(work / route) for route in ("separate", "one-by-one", "together")}
    same = acc["separate"] == acc["one-by-one"] == acc["together"] and len(acc["together"]) == k
    result = {"k": k, "cache": opts["cache"], "steps_per_epoch": int(opts["steps"]), "epochs": int(opts["epochs"]),
              "threads": int(opts["threads"]), "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "seconds": {"separate": round(separate, 1), "one_by_one": round(one_by_one, 1),
                          "together": round(together, 1)},
              "together_vs_separate": round(together / separate, 3),
              "together_vs_one_by_one": round(together / one_by_one, 3),
              "same_test_accuracy": same, "test_accuracy": acc["together"]}
    lines = [f"# {k} students in one pass (bench/together.py)", "",
             f"{k} BiLSTM/TextCNN variants, seed 0, {opts['epochs']} epoch(s) of at most {opts['steps']} batches of 64 "
             f"from `{opts['cache']}`, {opts['threads']} torch threads, {result['host']}.", "",
             "| route | wall time (s) | × together |", "|---|---:|---:|",
             *(f"| {name} | {sec:.1f} | {sec / together:.2f} |" for name, sec in
               (("separate processes", separate), ("one process, one by one", one_by_one),
                ("one process, together", together))), "",
             f"Test accuracy identical on all three routes: {'yes' if same else 'NO'}."]
    out = ROOT / opts["out"]
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not same:
        sys.exit(f"routes disagree: {acc}")


if __name__ == "__main__":
    main(sys.argv[1:])
