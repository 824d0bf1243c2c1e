"""Student quality side by side with references written outside the project (issue 15).

One run, the same rows for everybody: the tweet corpus as a user's own Parquet file with a split column
(8,000 train / 3,800 dev / 3,800 test, exact duplicate texts removed first), the MiniLM-L6 teacher
fine-tuned 2 epochs, Tang augmentation (n_iter 4), one logits + [CLS] cache (configs/quality.yaml). Stage
one runs through the project's entry points, as `make teacher-cache` would. Then, per seed:
  - bench/reference_bilstm.py, a plain PyTorch BiLSTM that imports nothing from the project and reads the
    cache's Arrow shards with pyarrow (plain: gold rows; distil: train + Tang rows, CE + logit MSE; textbrewer:
    the same model and rows distilled by TextBrewer 0.2.1, installed apart under work/quality/textbrewer);
  - the project's students through `python -m trainer.train` with the defaults (what `make student` runs);
  - ablations: the distilled BiLSTM with one setting changed from the defaults.
Reports mean ± s.d. over seeds of test accuracy (best dev epoch) beside the teacher and the targets. The jobs
and targets are listed in bench/quality_jobs.py.
Finished runs are kept in bench/results/quality-runs/ (committed: a fresh clone reuses them, and its summary
is rebuilt from them) and reused, so an interrupted benchmark resumes. Each is keyed by its effective settings and
by the stage one it trained from (the teacher's weights and the cached sets' fingerprints): a teacher fine-tuned
again to other weights reruns every job instead of mixing results of two teachers.

    python bench/quality.py [seeds=0,1,2] [jobs=2] [threads=1] [stage_one_threads=2] [only=name,...]
                            [groups=main,ablation] [stage_one=reuse]

stage_one=reuse trains from the cache an earlier invocation built (after a change to stage-two code only). A job
with `tang_n_iter` trains from a second cache of the same teacher and split with that many Tang rounds; one with
`tinybert_samples` from a cache that adds that many TinyBERT-augmented rows per training row; one with `layers`
("fp16" or "int8") from a cache of the gold rows only that also stores the token-level fields the small-BERT methods
read (hidden states, pre-softmax attention, values), as fp16 or as `cache.quantize=int8` (issue 14).

jobs runs that many trainings at once (each with `threads` torch threads); a 2-core machine gets more from
two 1-thread LSTMs than from one 2-thread one. Results: bench/results/quality.json and quality.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.quality_jobs import JOBS, TARGETS  # noqa: E402
from data import assets  # noqa: E402
from data.io import atomic_write_text  # noqa: E402

WORK = ROOT / "work" / "quality"
RUNS = ROOT / "bench" / "results" / "quality-runs"  # committed: results outlive the machine that computed them
CONFIG = "configs/quality.yaml"
SPLIT = {"train": 8000, "dev": 3800, "test": 3800}
TANG_N_ITER = 4  # the benchmark's augmentation; a job's `tang_n_iter` trains from a second cache instead


# a layered cache (gold rows only): embeddings and the layers a 2-layer student maps to (uniform map: 3, 6), the
# attention of those layers and the last layer's values: TinyBERT, DistilBERT and MiniLM read nothing else
LAYERED = ["cache.use_augmented=false", "cache.hidden_layers=0,3,6", "cache.attention_layers=3,6",
           "cache.store_values=true"]


def variant(job: dict) -> tuple[int, int, str]:
    """A job's cache: (Tang n_iter, TinyBERT samples per training row (0 = none), token-level storage ("" = logits
    + [CLS] only; "fp16" / "int8" = the layered cache of gold rows))."""
    if job.get("layers"):
        return 0, 0, job["layers"]
    return job.get("tang_n_iter", TANG_N_ITER), job.get("tinybert_samples", 0), ""


def _suffix(n_iter: int, tinybert: int, layers: str = "") -> str:
    if layers:
        return f"-layers-{layers}"
    if (n_iter, tinybert) == (TANG_N_ITER, 0):
        return ""
    return f"-tang{n_iter}" + (f"-tinybert{tinybert}" if tinybert else "")


def cache_dir(n_iter: int = TANG_N_ITER, tinybert: int = 0, layers: str = "") -> Path:
    """The cache a job trains from: the same teacher and split, Tang rows of this n_iter (+ TinyBERT rows), or the
    layered cache of gold rows."""
    return WORK / "cache" / f"minilm-tweets{_suffix(n_iter, tinybert, layers)}"


def augment_dir(n_iter: int, tinybert: int = 0) -> str:
    return f"work/quality/augment{_suffix(n_iter, tinybert)}"


def sh(args: list[str], env: dict | None = None) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True, env=env)


def _decode(raw: bytes) -> str | None:
    """The corpus mixes encodings: rows that are not UTF-8 are left out (the project would quarantine them)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def make_split(path: Path, seed: int = 0) -> None:
    """The corpus as a user's own file: distinct texts, a seeded permutation cut into train/dev/test."""
    if path.is_file():
        return
    table = pacsv.read_csv(assets.tweets_csv())
    texts = [_decode(t) for t in table.column("text").to_pylist()]
    labels = table.column("sentiment").to_pylist()
    seen, keep = set(), []
    for i, t in enumerate(texts):
        key = " ".join((t or "").split()).lower()
        if key and key not in seen:
            seen.add(key)
            keep.append(i)
    order = np.random.default_rng(seed).permutation(keep)
    splits = [s for s, n in SPLIT.items() for _ in range(n)]
    rows = order[: len(splits)]
    out = pa.table({"text": [texts[i] for i in rows], "label": [labels[i] for i in rows], "split": splits})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


TEXTBREWER = "textbrewer==0.2.1"  # an outside reference only: never a dependency of the project


def threads_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def textbrewer_path(py: str) -> Path:
    """TextBrewer in a folder of its own (pip --target, no deps: it runs on the venv's torch), put on PYTHONPATH
    for the reference that uses it and nowhere else."""
    target = WORK / "textbrewer"
    if not (target / "textbrewer").is_dir():
        sh([py, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), TEXTBREWER], dict(os.environ))
    return target


def stage_one(py: str, threads: int, n_iter: int, tinybert: int, layers: str = "") -> None:
    """Split, augmentation (Tang; TinyBERT's MLM + GloVe substitution with `tinybert` samples per row, the same
    Tang rows beside them) and the teacher cache, through the project's entry points; a layered cache skips the
    augmentation."""
    make_split(WORK / "tweets-split.parquet")
    env = threads_env(threads)
    if layers:
        quantize = ["cache.quantize=int8"] if layers == "int8" else []
        sh([py, "-m", "pipeline.teacher_cache", "--config", CONFIG,
            f"cache.name={cache_dir(n_iter, tinybert, layers).name}", *LAYERED, *quantize], env)
        return
    aug = augment_dir(n_iter, tinybert)
    methods = ["methods=[tang,tinybert]", f"tinybert.n_samples={tinybert}"] if tinybert else []
    sh([py, "-m", "pipeline.train_teacher", "--config", CONFIG, "--data-only"], env)
    sh([py, "-m", "augment.run", "--config", "configs/augment.yaml", "data_dir=work/quality/data", f"out_dir={aug}",
        f"cache_dir={aug}/cache", f"tang.n_iter={n_iter}", f"workers={threads}", *methods], env)
    sh([py, "-m", "pipeline.teacher_cache", "--config", CONFIG, f"cache.name={cache_dir(n_iter, tinybert).name}",
        f"cache.augment_dir={aug}"], env)  # fine-tunes the teacher unless it is


# the trainer settings a project run inherits when its job leaves them alone: every TrainConfig field (so a new one
# is keyed) but those the trainer's own run key leaves out (trainer/run_key.py UNKEYED; `epochs` is keyed here, as
# the trainer keys it through its stages) and these, which the benchmark sets per run or never changes
BENCH_SET = frozenset({"seed", "dev_set", "workers", "max_steps_per_epoch"})
# trainer settings and student fields added after runs were kept, with the value those runs trained with: keyed
# only where a job's value differs from it
ADDED_LATER = {"ema_decay": 0.0}
STUDENT_ADDED_LATER = {"bilstm": {"num_layers": 1}}


def _keyed(settings: dict, added_later: dict = ADDED_LATER) -> dict:
    return {k: v for k, v in settings.items() if k not in added_later or v != added_later[k]}


def stage_one_identity() -> dict | None:
    """The teacher and split every cache of this benchmark shares, as a built cache's manifest names them: the
    teacher's weights and the train/dev/test fingerprints (augmented sets follow from the job's settings). None
    before any cache is built."""
    for manifest in sorted((WORK / "cache").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        return {"teacher": m["teacher"]["weights_sha256"],
                "splits": {name: m["sets"][name].get("fingerprint") for name in SPLIT if name in m["sets"]}}
    return None


def loss_defaults(loss: str) -> dict:
    """A loss's default params; a scheduled loss (TinyBERT's two stages): each stage's loss, epochs, lr and params."""
    from trainer.losses import get_loss
    from trainer.stages import SCHEDULES

    if loss in SCHEDULES:
        return {"stages": [{**dataclasses.asdict(stage), **loss_defaults(stage.loss)} for stage in SCHEDULES[loss]()]}
    return dataclasses.asdict(get_loss(loss).params_cls())


def job_key(name: str) -> str:
    """What a kept result was computed from: the stage one it read (stage_one_identity), and a reference's script
    bytes or a project run's effective settings (trainer recipe, student config and loss params: today's defaults
    with the job's own values on top). A changed default reruns the jobs it reaches and keeps the rest."""
    job = JOBS[name][1]
    if "reference" in job:
        material = {"job": job, "script": hashlib.sha256((ROOT / "bench" / "reference_bilstm.py").read_bytes()).hexdigest()}
        if job["reference"] == "textbrewer":
            material["library"] = TEXTBREWER
    else:
        from data.config import load_config
        from trainer.run_key import UNKEYED
        from trainer.students import STUDENTS
        from trainer.train import TrainConfig

        spec = job["spec"]
        left_out = (UNKEYED - {"epochs"}) | BENCH_SET
        train = dataclasses.asdict(load_config(TrainConfig, None, job.get("overrides", [])))  # typed as the CLI does
        lr = spec.get("lr") or STUDENTS[spec["student"]].default_lr  # the peak lr the run trains with
        material = {"run": {**{k: spec.get(k) for k in ("student", "loss", "epochs")}, "lr": lr},
                    "train": _keyed({k: v for k, v in train.items() if k not in left_out}),
                    "student": _keyed({**dataclasses.asdict(STUDENTS[spec["student"]].config_class()),
                                       **spec.get("student_params", {})}, STUDENT_ADDED_LATER.get(spec["student"], {})),
                    "loss": {**loss_defaults(spec["loss"]), **spec.get("loss_params", {})}}
        if job.get("tang_n_iter", TANG_N_ITER) != TANG_N_ITER:
            material["tang_n_iter"] = job["tang_n_iter"]
        if job.get("tinybert_samples"):
            material["tinybert_samples"] = job["tinybert_samples"]
        if job.get("layers"):
            material["layers"] = {"storage": job["layers"], "cache": LAYERED}
    material["stage_one"] = stage_one_identity()
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_settings(name: str, seed: int) -> dict | None:
    """A kept result of another job with the very same effective settings and seed (an ablation that a new
    default turned into the defaults), kept again under this job's name; None if there is none."""
    key = job_key(name)
    for path in sorted(RUNS.glob("*.json")):  # stale ones too: kept under an earlier default
        other = json.loads(path.read_text())
        if other.get("key") == key and other.get("seed") == seed and other.get("job") != name:
            result = {**other, "job": name, "same_as": other["job"]}
            atomic_write_text(RUNS / f"{name}-s{seed}.json", json.dumps(result, indent=2))
            print(f"{name} seed {seed}: same settings as {other['job']}, its result is reused")
            return result
    return None


def kept_result(name: str, seed: int) -> dict | None:
    """The kept result of (job, seed) if it was computed from today's settings (a stale one is set aside), else
    one of another job with the same settings."""
    done = RUNS / f"{name}-s{seed}.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("key") == job_key(name):
            return result
        stale = done.with_name(f"{done.stem}.stale-{result.get('key', 'unkeyed')}.json")
        print(f"{name} seed {seed}: kept result computed from other settings, moved to {stale.name}")
        done.rename(stale)
    return same_settings(name, seed)


def run_job(py: str, name: str, seed: int, threads: int) -> dict:
    """One training (kept under RUNS, keyed by job_key); returns its result dict."""
    kept = kept_result(name, seed)
    if kept:
        return kept
    done = RUNS / f"{name}-s{seed}.json"
    _, job = JOBS[name]
    env = threads_env(threads)
    cache = cache_dir(*variant(job))
    out_dir = WORK / "students" / f"{name}-s{seed}"
    t0 = time.time()
    if "reference" in job:
        emb, index = assets.glove_paths()
        out_dir.mkdir(parents=True, exist_ok=True)
        if job["reference"] == "textbrewer":
            env["PYTHONPATH"] = str(textbrewer_path(py))
        sh([py, "bench/reference_bilstm.py", str(cache), str(emb), str(index), "--mode", job["reference"],
            "--seed", str(seed), "--out", str(out_dir / "result.json")], env)
        result = json.loads((out_dir / "result.json").read_text())
    else:
        spec = json.dumps({**job["spec"], "name": name})
        sh([py, "-m", "trainer.train", f"cache={cache}", f"runs=[{spec}]", f"seed={seed}", f"out_dir={out_dir}",
            "measure_latency=false", "checkpoint_every=0", "baseline=false", *job.get("overrides", [])], env)
        result = json.loads((out_dir / "results.json").read_text())[0]
    result.update(job=name, seed=seed, key=job_key(name), wall_seconds=round(time.time() - t0, 1))
    atomic_write_text(done, json.dumps(result, indent=2))
    return result


# means of accuracies over the same test rows that count equal correct rows may differ in their last bits (one
# test row is 1/3,800 = 2.6e-4): a target met by equality must read "met"
FLOAT_SLACK = 1e-9


def summarise(results: list[dict], teacher: float | None) -> dict:
    by_job: dict[str, list[dict]] = {}
    for r in results:
        by_job.setdefault(r["job"], []).append(r)
    rows = {}
    for name, rs in by_job.items():
        acc = [r["test_accuracy"] for r in rs]
        dev = [r["dev_accuracy"] for r in rs]
        rows[name] = {"group": JOBS[name][0], "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                      "test_mean": statistics.mean(acc), "test_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                      "dev_mean": statistics.mean(dev), "test": acc,
                      "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in rs)}
    targets = []
    for job, gap, ref in TARGETS:
        base = teacher if ref == "teacher" else rows.get(ref, {}).get("test_mean")
        if job in rows and base is not None:
            need = base - gap
            targets.append({"job": job, "measured": rows[job]["test_mean"], "needed": need, "reference": ref,
                            "met": rows[job]["test_mean"] >= need - FLOAT_SLACK})
    return {"teacher_test_accuracy": teacher, "runs": rows, "targets": targets}


def markdown(summary: dict, wall: float) -> str:
    t = summary["teacher_test_accuracy"]
    lines = ["# Student quality (bench/quality.py)\n",
             f"Teacher (MiniLM-L6, fine-tuned 2 epochs): test accuracy {100 * t:.1f}.  " if t else "",
             f"Split: {SPLIT['train']:,} train / {SPLIT['dev']:,} dev / {SPLIT['test']:,} test tweets; "
             f"Tang n_iter {TANG_N_ITER} "
             "(group int8: gold rows only, from a cache with hidden states, attention and values stored fp16 or int8). "
             f"Student training, all runs: {sum(r['wall_seconds_mean'] * r['n'] for r in summary['runs'].values()) / 60:.0f}"
             f" min of wall time (2 runs at a time, 1 thread each); this invocation: {wall / 60:.1f} min.\n",
             "| run | group | seeds | test acc (mean ± s.d.) | dev acc | Δ vs teacher | min/run |",
             "|---|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        delta = f"{100 * (r['test_mean'] - t):+.1f}" if t else ""
        spread = f" ± {100 * r['test_sd']:.1f}" if r["n"] > 1 else " (one seed)"
        lines.append(f"| {name} | {r['group']} | {r['n']} | {100 * r['test_mean']:.1f}{spread} | "
                     f"{100 * r['dev_mean']:.1f} | {delta} | {r['wall_seconds_mean'] / 60:.1f} |")
    lines += ["", "| target | measured | needed | met |", "|---|---|---|---|"]
    for g in summary["targets"]:
        lines.append(f"| {g['job']} ≥ {g['reference']} − gap | {100 * g['measured']:.2f} | {100 * g['needed']:.2f} | "
                     f"{'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    seeds = [int(s) for s in opts.get("seeds", "0,1,2").split(",")]
    groups = opts.get("groups", "main,ablation").split(",")
    names = opts["only"].split(",") if "only" in opts else [n for n, (g, _) in JOBS.items() if g in groups]
    unknown = set(names) - set(JOBS)
    if unknown:
        sys.exit(f"unknown job(s) {sorted(unknown)}; known: {list(JOBS)}")
    py = sys.executable
    t0 = time.time()
    for aug in sorted({variant(JOBS[n][1]) for n in names}):
        built = (cache_dir(*aug) / "manifest.json").is_file() and not (cache_dir(*aug) / "plan.arrow").exists()
        if opts.get("stage_one") == "reuse" and built:  # a cache with a pending plan was cut short: finish it
            print(f"stage_one=reuse: training from the cache already at {cache_dir(*aug)}")
        else:
            stage_one(py, int(opts.get("stage_one_threads", 2)), *aug)
    work = [(n, s) for s in seeds for n in names]  # seed by seed: a cut-short invocation still compares like with like
    with ThreadPoolExecutor(int(opts.get("jobs", 2))) as pool:
        results = list(pool.map(lambda job: run_job(py, *job, int(opts.get("threads", 1))), work))
    kept = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json")) if ".stale-" not in p.name]
    done = [r for r in kept if r["job"] in JOBS and r.get("key") == job_key(r["job"])]  # earlier invocations too
    teacher = next((r["teacher_test_accuracy"] for r in done if r.get("teacher_test_accuracy") is not None), None)
    summary = summarise(done, teacher)
    summary["stage_one"] = stage_one_identity()
    summary["invocation"] = {"jobs": names, "seeds": seeds, "wall_seconds": round(time.time() - t0, 1),
                             "new_runs": len(results)}
    out = Path(opts.get("out", ROOT / "bench" / "results" / "quality.json"))
    atomic_write_text(out, json.dumps(summary, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown(summary, time.time() - t0))
    print(markdown(summary, time.time() - t0))


if __name__ == "__main__":
    main(sys.argv[1:])
