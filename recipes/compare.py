"""`python -m recipes.compare` (`make compare`): the distillation catalogue reproduced on one corpus.

One command: make sure both teacher caches exist (the primary teacher of `teacher_config`
and the weaker second teacher of `teacher2_config` that Dynamic KD needs, over the same
rows; a missing or unfinished cache is built with pipeline.teacher_cache.build_cache),
train every run of `train.runs` with `train_all` (same cache, same seed, same budget),
then write

  reports/compare.md    the table (teachers, undistilled students, every method) + orderings
  reports/compare.json  the same numbers
  reports/compare.png   a bar chart (matplotlib, Agg backend)

`train.cache` / `train.cache2` are filled from the two teacher configs. `only=a,b` keeps
the named runs (quick checks); any `train.*` key can be overridden (`train.epochs=1`).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from data.config import load_config, parse_cli, save_config
from data.io import UserError, atomic_write_text, run_cli
from data.metrics import classification_metrics
from pipeline.cache_reader import TeacherCache
from pipeline.run_config import RunConfig
from trainer.evaluate import markdown_table
from trainer.run_key import plan_stages
from trainer.train import RunSpec, TrainConfig, plan_runs, train_all


@dataclass
class CompareConfig:
    teacher_config: str = "configs/cpu.yaml"  # stage-one config of the primary (strong) teacher
    teacher2_config: str = "configs/teacher2.yaml"  # the second (weak) teacher, same data; "" = none
    build_caches: bool = True  # build a missing cache (false: a one-line error naming the make target)
    only: list[str] = field(default_factory=list)  # run names to keep (empty: every run)
    report: str = "reports/compare.md"  # .json beside it
    plot: str = "reports/compare.png"  # "" = no chart
    title: str = "Distillation methods on the default tweet corpus"
    train: TrainConfig = field(default_factory=TrainConfig)  # runs, epochs, seed, ...; cache/cache2 are filled in


METHOD = {  # loss -> what the table calls it
    "ce": "fine-tuned on gold labels (no KD)",
    "hinton": "Hinton KD (soft targets + CE)",
    "tang_mse": "Tang et al. 2019 (logit MSE + CE)",
    "pkd": "Patient KD (PKD)",
    "tinybert": "TinyBERT (intermediate, then prediction)",
    "tinybert_intermediate": "TinyBERT stage 1 only",
    "tinybert_pred": "TinyBERT stage 2 only",
    "distilbert": "DistilBERT (soft CE + CE + cosine)",
    "minilm": "MiniLM (attention + value relations)",
    "ckd": "CKD (word + layer relations)",
    "dynakd_teacher": "Dynamic KD: teacher adjustment",
    "dynakd_data": "Dynamic KD: data selection",
    "dynakd_supervision": "Dynamic KD: supervision adjustment",
}

REFERENCE = """\
Reference results from the papers (other data sets and model sizes: compare **orderings**, not numbers):

- Tang et al. 2019, SST-2 test: BERT-large 94.9 > distilled BiLSTM 90.7 > BiLSTM 86.7.
- TinyBERT4 on SST-2: 92.6; DistilBERT keeps 97% of BERT with 40% fewer parameters.
- RTE, a course reproduction: strong teacher 72.5 > weak teacher 67.8 > CKD 67.3 > dynamic teacher 66.6 >
  KD(strong) 66.0 > KD(weak) 65.4 > dynamic data 64.4 > student fine-tuned 63.7 > dynamic supervision 60.8."""


# ---------------------------------------------------------------- caches
def cache_dir_of(run: RunConfig) -> Path:
    """Where pipeline.teacher_cache puts this config's cache (cache.root / cache.name or the teacher folder's name)."""
    return Path(run.cache.root) / (run.cache.name or Path(run.teacher.out_dir).name)


def cache_ready(path: Path, splits) -> bool:
    """A manifest, no unfinished shard plan, and rows of every split asked for."""
    if not (path / "manifest.json").is_file():
        return False
    from pipeline.cache_plan import load_plan

    if load_plan(path) is not None:
        return False
    have = {s.set for s in TeacherCache(path).manifest.shards}
    return set(splits) <= have


def ensure_cache(config_path: str, build: bool, what: str) -> tuple[RunConfig, Path]:
    run = load_config(RunConfig, config_path)
    path = cache_dir_of(run)
    if cache_ready(path, run.cache.splits):
        print(f"{what}: cache {path}")
        return run, path
    if not build:
        raise UserError(f"{what}: no finished teacher cache at {path}: run `make teacher-cache CONFIG={config_path}` "
                        "(or build_caches=true)")
    print(f"{what}: no finished cache at {path}: building it from {config_path} (fine-tunes the teacher if needed)")
    from pipeline.teacher_cache import build_cache  # stage one, only when a cache is missing

    t0 = time.time()
    summary = build_cache(run)
    print(f"{what}: cache {summary['cache']} ready ({summary['rows_in_cache']} rows, {time.time() - t0:.0f} s)")
    return run, Path(summary["cache"])


def needs_second_teacher(run: RunSpec, cfg: TrainConfig) -> bool:
    from trainer.losses import get_loss

    return any(get_loss(s.loss).needs_second_teacher for s in plan_stages(run, cfg))


# ---------------------------------------------------------------- teacher rows
def _logit_metrics(cache: TeacherCache, split: str) -> dict:
    rows = cache.row_table([split], ["label", "logits"])
    labels = np.array([-1 if y is None else y for y in rows.column("label").to_pylist()])
    preds = np.array(rows.column("logits").to_pylist(), dtype=np.float32).argmax(-1)
    keep = labels >= 0
    return classification_metrics(preds[keep], labels[keep], cache.num_labels)


def _teacher_params(path: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="np") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def teacher_row(name: str, cache_dir: Path, run: RunConfig, cfg: TrainConfig) -> dict:
    """Accuracy / macro-F1 of the teacher's cached logits; params and fine-tuning s/epoch from its folder."""
    cache = TeacherCache(cache_dir)
    t = cache.manifest.teacher
    dev, test = _logit_metrics(cache, cfg.dev_set), _logit_metrics(cache, cfg.test_set)
    folder = Path(run.teacher.out_dir)
    seconds = None
    if (folder / "metrics.json").is_file():
        history = json.loads((folder / "metrics.json").read_text()).get("history") or []
        if history and all("seconds" in h for h in history):
            seconds = float(np.mean([h["seconds"] for h in history]))
    return {"run": name, "student": f"{t.model_type} {t.num_layers}L/{t.hidden_size}", "loss": "teacher",
            "method": "teacher (cached logits)", "teacher": cache_dir.name, "dev_accuracy": dev["accuracy"],
            "dev_macro_f1": dev["macro_f1"], "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "test_teacher_agreement": None, "params": _teacher_params(folder), "epoch_seconds": seconds,
            "kind": "teacher"}


# ---------------------------------------------------------------- report
COLUMNS = [("model", "run", ""), ("student", "student", ""), ("method", "method", ""), ("teacher", "teacher", ""),
           ("dev acc", "dev_accuracy", ".4f"), ("dev F1", "dev_macro_f1", ".4f"),
           ("test acc", "test_accuracy", ".4f"), ("test F1", "test_macro_f1", ".4f"),
           ("agree w/ T (test)", "test_teacher_agreement", ".3f"), ("params", "params", ",d"),
           ("s/epoch", "epoch_seconds", ".1f"), ("ms/sent b64", "latency_b64_ms", ".2f")]


def orderings(rows: list[dict], se: float = 0.0) -> list[str]:
    """The reference orderings that can be checked on this run's rows: one line each, ✓ or ✗
    (and "within noise" when the two accuracies differ by less than one standard error `se`)."""
    by = {r["run"]: r for r in rows}
    acc = lambda name: by[name]["test_accuracy"] if name in by else None  # noqa: E731
    lines = []

    def check(text: str, ok, gap: float | None = None) -> None:
        if ok is not None:
            noise = " (within noise)" if gap is not None and abs(gap) < se else ""
            lines.append(f"- {'✓' if ok else '✗'} {text}{noise}")

    teachers = [r for r in rows if r.get("kind") == "teacher"]
    students = [r for r in rows if r.get("kind") != "teacher"]
    if teachers and students:
        best = max(students, key=lambda r: r["test_accuracy"])
        check(f"the teacher ({teachers[0]['test_accuracy']:.4f}) is at least as good as the best student "
              f"({best['run']}, {best['test_accuracy']:.4f})", teachers[0]["test_accuracy"] >= best["test_accuracy"])
    if len(teachers) > 1:
        strong, weak = teachers[0]["test_accuracy"], teachers[1]["test_accuracy"]
        check(f"strong teacher ({strong:.4f}) > weak teacher ({weak:.4f})", strong > weak, strong - weak)
    for family in sorted({r["student"] for r in students}):
        base = next((r for r in students if r["student"] == family and r["loss"] == "ce"), None)
        if base is None:
            continue
        for r in students:
            if r["student"] == family and r["loss"] != "ce":
                check(f"{r['run']} ({r['test_accuracy']:.4f}) beats its undistilled twin {base['run']} "
                      f"({base['test_accuracy']:.4f})", r["test_accuracy"] > base["test_accuracy"],
                      r["test_accuracy"] - base["test_accuracy"])
    if acc("smallbert-hinton") is not None:
        for name in ("smallbert-dynakd_teacher", "smallbert-ckd"):
            if acc(name) is not None:
                check(f"{name} ({acc(name):.4f}) >= KD from the strong teacher, smallbert-hinton "
                      f"({acc('smallbert-hinton'):.4f}) (RTE reference: yes)", acc(name) >= acc("smallbert-hinton"),
                      acc(name) - acc("smallbert-hinton"))
    return lines


def write_plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    names = [r["run"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.6))
    colours = ["#7f7f7f" if r.get("kind") == "teacher" else "#1f77b4" if r["student"] == "smallbert" else "#ff7f0e"
               for r in rows]
    ax.barh(y - 0.2, [r["test_accuracy"] for r in rows], 0.4, color=colours, label="test accuracy")
    ax.barh(y + 0.2, [r["test_macro_f1"] for r in rows], 0.4, color=colours, alpha=0.45, label="test macro-F1")
    for i, r in enumerate(rows):
        ax.text(r["test_accuracy"] + 0.005, i - 0.2, f"{r['test_accuracy']:.3f}", va="center", fontsize=7)
    teachers = [r for r in rows if r.get("kind") == "teacher"]
    if teachers:
        ax.axvline(teachers[0]["test_accuracy"], color="#7f7f7f", ls="--", lw=1)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("test set (grey: teachers, orange: BiLSTM/TextCNN, blue: small BERT; light bars: macro-F1)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(cfg: CompareConfig, rows: list[dict], runs: list[RunSpec], seconds: float) -> str:
    t = cfg.train
    rows_per_epoch = f"at most {t.max_steps_per_epoch} batches of {t.batch_size}" if t.max_steps_per_epoch \
        else f"batches of {t.batch_size}"
    n_test = TeacherCache(t.cache).row_table([t.test_set], ["label"]).num_rows
    se = math.sqrt(0.25 / max(1, n_test))
    sets = ", ".join(t.train_sets) if t.train_sets else "train" + (" + aug-*" if t.use_augmented else "")
    setup = [
        f"- caches: `{t.cache}` (primary teacher)" + (f", `{t.cache2}` (second, weaker teacher: Dynamic KD)"
                                                         if t.cache2 else ""),
        f"- training sets: {sets}; "
        f"epochs: {t.epochs} ({rows_per_epoch}); seed {t.seed}; best epoch on dev, then test",
        f"- {n_test} test rows: one standard error of an accuracy is up to ±{se:.3f}; smaller gaps are noise",
        f"- host: {platform.machine()}, {platform.system()}; {len([r for r in rows if r.get('kind') != 'teacher'])} "
        f"student runs in {seconds / 60:.1f} min; s/epoch is the training time of one epoch (teachers: fine-tuning)",
    ]
    hyper = []
    for r in runs:
        extra = []
        if r.student_params:
            extra.append("student " + json.dumps(r.student_params, sort_keys=True))
        if r.loss_params:
            extra.append("loss " + json.dumps(r.loss_params, sort_keys=True))
        if r.stages:
            extra.append("stages " + ", ".join(f"{s.loss} ×{s.epochs} epochs" + (f" lr {s.lr:g}" if s.lr else "")
                                               for s in r.stages))
        if r.lr:
            extra.append(f"lr {r.lr:g}")
        hyper.append(f"- `{r.name}`: " + ("; ".join(extra) if extra else "defaults"))
    checks = orderings(rows, se)
    text = "\n".join([
        f"# {cfg.title}", "",
        f"Written by `python -m recipes.compare` on {time.strftime('%Y-%m-%d %H:%M')}. Methods: docs/methods.md.", "",
        *setup, "", markdown_table(rows, COLUMNS), "",
        f"![test accuracy per run]({os.path.relpath(cfg.plot, Path(cfg.report).parent)})" if cfg.plot else "", "",
        "## Orderings", "", REFERENCE, "", "On this run:", "", *(checks or ["- (no comparable pairs)"]), "",
        "## Runs", "", *hyper, "",
    ])
    return text


def compare(cfg: CompareConfig) -> list[dict]:
    t0 = time.time()
    plan = plan_runs(replace(cfg.train, baseline=False))  # configs/compare.yaml lists its ce runs itself
    if cfg.only:
        unknown = sorted(set(cfg.only) - {r.name for r in plan})
        if unknown:
            raise UserError(f"only: no run named {unknown}; runs: {', '.join(r.name for r in plan)}")
        plan = [r for r in plan if r.name in cfg.only]
    if not plan:
        raise UserError("no runs to compare: list them under train.runs")
    run1, cache1 = ensure_cache(cfg.teacher_config, cfg.build_caches, "teacher")
    need2 = [r.name for r in plan if needs_second_teacher(r, cfg.train)]
    run2 = cache2 = None
    if need2 and cfg.teacher2_config:
        run2, cache2 = ensure_cache(cfg.teacher2_config, cfg.build_caches, "second teacher")
    elif need2:
        print(f"no teacher2_config: skipping {', '.join(need2)} (Dynamic KD teacher adjustment needs two teachers)")
        plan = [r for r in plan if r.name not in need2]
    train = replace(cfg.train, cache=str(cache1), cache2=str(cache2) if cache2 else "", runs=plan,
                    seeds=[], sweep={})  # `plan` holds the seeds and sweep already
    cfg = replace(cfg, train=train)
    t_students = time.time()
    results = train_all(train)
    students = time.time() - t_students
    rows = [teacher_row("teacher", cache1, run1, train)]
    if cache2 is not None:
        rows.append(teacher_row("teacher2 (weak)", cache2, run2, train))
    for r in results:
        loss = r["loss"]
        teacher = "T + T2" if needs_second_teacher(next(p for p in plan if p.name == r["run"]), train) else \
            ("–" if loss == "ce" else "T")
        rows.append({**r, "method": METHOD.get(loss, loss), "teacher": teacher, "kind": "student"})
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report, write_report(cfg, rows, plan, students))
    atomic_write_text(report.with_suffix(".json"), json.dumps({"rows": rows, "seconds": round(time.time() - t0, 1)},
                                                                indent=2))
    save_config(cfg, report.parent, report.stem + ".config.json")
    if cfg.plot:
        write_plot(rows, Path(cfg.plot), cfg.title)
    print(markdown_table(rows, COLUMNS))
    print(f"wrote {report}" + (f", {cfg.plot}" if cfg.plot else "") + f" in {(time.time() - t0) / 60:.1f} min")
    return rows


def main(argv: list[str]) -> int:
    compare(parse_cli(CompareConfig, argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
