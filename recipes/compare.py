"""`python -m recipes.compare` (`make compare`): the distillation catalogue reproduced on one corpus, ranked.

One command: make sure both teacher caches exist (the primary teacher of `teacher_config`
and the weaker second teacher of `teacher2_config` that Dynamic KD needs, over the same
rows; a missing or unfinished cache is built with pipeline.teacher_cache.build_cache),
train every run of `train.runs` per seed of `train.seeds` with `train_all` (same cache and
budget), then write

  reports/compare.md    per setting: mean ± s.d. over seeds, the paired difference to its ce twin over
                        every test row with a 95% bootstrap interval (real / within noise), the orderings
  reports/compare.json  the same rows, and every single run
  reports/compare.png   the means with their s.d., beside the paired intervals (matplotlib, Agg backend)

`train.cache` / `train.cache2` are filled from the two teacher configs. `only=a,b` keeps
the named settings; any `train.*` key can be overridden (`train.epochs=1`); `--quick` is the
demo's budget (one seed, at most 75 batches an epoch) in folders of its own.
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
from trainer.paired import interval_text
from trainer.sweep import setting_of, summarise
from trainer.train import RunSpec, TrainConfig, plan_runs, train_all


@dataclass
class CompareConfig:
    teacher_config: str = "configs/cpu.yaml"  # stage-one config of the primary (strong) teacher
    teacher2_config: str = "configs/teacher2.yaml"  # the second (weak) teacher, same data; "" = none
    build_caches: bool = True  # build a missing cache (false: a one-line error naming the make target)
    quick: bool = False  # the demo's budget (`--quick`): one seed, at most 75 batches an epoch, reports/compare-quick.*
    resamples: int = 2000  # bootstrap resamples of the test rows for each paired difference
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
            "kind": "teacher", "test_cell": f"{test['accuracy']:.4f}"}


# ---------------------------------------------------------------- report
COLUMNS = [("model", "run", ""), ("student", "student", ""), ("method", "method", ""), ("teacher", "teacher", ""),
           ("seeds", "n", "d"), ("dev acc", "dev_accuracy", ".4f"), ("test acc (± s.d.)", "test_cell", ""),
           ("test F1", "test_macro_f1", ".4f"), ("vs ce twin, paired [95% CI]", "paired", ""),
           ("agree w/ T (test)", "test_teacher_agreement", ".3f"), ("params", "params", ",d"),
           ("s/epoch", "epoch_seconds", ".1f"), ("ms/sent b64", "latency_b64_ms", ".2f")]
AVERAGED = ("dev_accuracy", "dev_macro_f1", "test_accuracy", "test_macro_f1", "test_teacher_agreement",
            "epoch_seconds", "latency_b64_ms")


def setting_rows(results: list[dict], plan: list[RunSpec], train: TrainConfig) -> list[dict]:
    """One row per setting (a run repeated over seeds): means, the test s.d., and the paired difference to its ce
    twin over the test rows with a 95% bootstrap interval (trainer/paired.py)."""
    summary = {row["setting"]: row for row in summarise(results)["settings"]}
    spec = {r.name: r for r in plan}
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        repeats = [r for r in results if r["setting"] == setting]
        first, stats = repeats[0], summary[setting]
        mean = {k: float(np.mean(v)) if (v := [r[k] for r in repeats if r.get(k) is not None]) else None
                for k in AVERAGED}
        sd = stats["test_accuracy"]["sd"]
        loss = first["loss"]
        teacher = "T + T2" if needs_second_teacher(spec[first["run"]], train) else ("–" if loss == "ce" else "T")
        rows.append({"run": setting, "student": first["student"], "loss": loss, "method": METHOD.get(loss, loss),
                     "teacher": teacher, "kind": "student", "n": len(repeats), **mean, "test_sd": sd,
                     "test_cell": f"{mean['test_accuracy']:.4f}" + (f" ± {sd:.4f}" if sd is not None else ""),
                     "vs_ce_ci": stats["vs_ce_ci"], "paired": interval_text(stats["vs_ce_ci"]),
                     "params": first["params"], "runs": stats["runs"]})
    return rows


def orderings(rows: list[dict], se: float = 0.0) -> list[str]:
    """The reference orderings that can be checked on this run's rows: one line each, ✓ or ✗, and "within
    noise" when a method's paired 95% interval against its ce twin holds 0 (other pairs: when the two accuracies
    differ by less than one standard error `se`)."""
    by = {r["run"]: r for r in rows}
    acc = lambda name: by[name]["test_accuracy"] if name in by else None  # noqa: E731
    lines = []

    def check(text: str, ok, gap: float | None = None, within: bool | None = None) -> None:
        if ok is not None:
            within = within if within is not None else gap is not None and abs(gap) < se
            lines.append(f"- {'✓' if ok else '✗'} {text}{' (within noise)' if within else ''}")

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
                ci = r.get("vs_ce_ci")  # paired over the test rows when both sides saved predictions
                check(f"{r['run']} ({r['test_accuracy']:.4f}) beats its undistilled twin {base['run']} "
                      f"({base['test_accuracy']:.4f})", r["test_accuracy"] > base["test_accuracy"],
                      r["test_accuracy"] - base["test_accuracy"], None if ci is None else not ci["real"])
    if acc("smallbert-hinton") is not None:
        for name in ("smallbert-dynakd_teacher", "smallbert-ckd"):
            if acc(name) is not None:
                check(f"{name} ({acc(name):.4f}) >= KD from the strong teacher, smallbert-hinton "
                      f"({acc('smallbert-hinton'):.4f}) (RTE reference: yes)", acc(name) >= acc("smallbert-hinton"),
                      acc(name) - acc("smallbert-hinton"))
    return lines


def write_plot(rows: list[dict], path: Path, title: str) -> bool:
    """Left: test accuracy (mean, s.d. over seeds as whiskers). Right: each method's paired difference to its ce
    twin with the 95% bootstrap interval; solid where the interval excludes 0."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    y = np.arange(len(rows))
    colours = ["#7f7f7f" if r.get("kind") == "teacher" else "#1f77b4" if r["student"] == "smallbert" else "#ff7f0e"
               for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.42 * len(rows) + 1.8), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 2]})
    left.barh(y, [r["test_accuracy"] for r in rows], 0.6, color=colours,
              xerr=[r.get("test_sd") or 0 for r in rows], error_kw={"lw": 1, "capsize": 2})
    for i, r in enumerate(rows):
        left.text(r["test_accuracy"] + (r.get("test_sd") or 0) + 0.01, i, f"{r['test_accuracy']:.3f}", va="center",
                  fontsize=7)
    teachers = [r for r in rows if r.get("kind") == "teacher"]
    if teachers:
        left.axvline(teachers[0]["test_accuracy"], color="#7f7f7f", ls="--", lw=1)
    left.set_yticks(y, [r["run"] for r in rows], fontsize=8)
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel("test accuracy, mean ± s.d. over seeds (grey: teachers, orange: word students, blue: small BERT)",
                    fontsize=8)
    for i, r in enumerate(rows):
        ci = r.get("vs_ce_ci")
        if ci:
            right.errorbar(ci["diff"], i, xerr=[[ci["diff"] - ci["low"]], [ci["high"] - ci["diff"]]], fmt="o",
                           color=colours[i], mfc=colours[i] if ci["real"] else "white", capsize=3, lw=1.2)
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel("paired difference to the ce twin, 95% bootstrap interval\n(filled: the interval excludes 0)",
                     fontsize=8)
    fig.suptitle(title, fontsize=10)
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
    seeds = t.seeds or [t.seed]
    sets = ", ".join(t.train_sets) if t.train_sets else "train" + (" + aug-*" if t.use_augmented else "")
    setup = [
        f"- caches: `{t.cache}` (primary teacher)" + (f", `{t.cache2}` (second, weaker teacher: Dynamic KD)"
                                                         if t.cache2 else ""),
        f"- training sets: {sets}; epochs: {t.epochs} ({rows_per_epoch}); seeds {', '.join(map(str, seeds))}; "
        "best epoch on dev, then test",
        f"- {n_test} test rows: one standard error of an accuracy is up to ±{se:.3f}. Each method is paired with its "
        f"ce twin (same student and seed) on every test row; the interval is a 95% bootstrap over the rows "
        f"({cfg.resamples} resamples), and a difference is **real** when it excludes 0",
        f"- host: {platform.machine()}, {platform.system()}, {os.cpu_count()} CPUs; {len(runs)} student runs "
        f"(trained `together` = {t.together} per pass) in **{seconds / 60:.1f} min** of wall time; s/epoch is one "
        "epoch's training time (teachers: fine-tuning)",
    ]
    hyper = []
    for r in {setting_of(r): r for r in runs}.values():
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
        hyper.append(f"- `{setting_of(r)}`: " + ("; ".join(extra) if extra else "defaults"))
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


def quick_budget(cfg: CompareConfig) -> CompareConfig:
    """`--quick`: the demo's budget (one seed, at most 75 batches an epoch) in folders of its own."""
    suffix = lambda p: str(Path(p).with_name(Path(p).stem + "-quick" + Path(p).suffix)) if p else p  # noqa: E731
    return replace(cfg, report=suffix(cfg.report), plot=suffix(cfg.plot),
                   train=replace(cfg.train, seeds=[], max_steps_per_epoch=75, out_dir=cfg.train.out_dir + "-quick"))


def compare(cfg: CompareConfig) -> list[dict]:
    t0 = time.time()
    if cfg.quick:
        cfg = quick_budget(cfg)
    plan = plan_runs(replace(cfg.train, baseline=False))  # configs/compare.yaml lists its ce runs itself
    if cfg.only:
        unknown = sorted(set(cfg.only) - {setting_of(r) for r in plan})
        if unknown:
            raise UserError(f"only: no run named {unknown}; runs: {', '.join(dict.fromkeys(map(setting_of, plan)))}")
        plan = [r for r in plan if setting_of(r) in cfg.only]
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
                    seeds=[], sweep={}, baseline=False)  # `plan` holds the seeds and sweep already
    t_students = time.time()
    results = train_all(train)
    students = time.time() - t_students
    train = replace(train, seeds=cfg.train.seeds)  # for the report
    cfg = replace(cfg, train=train)
    rows = [teacher_row("teacher", cache1, run1, train)]
    if cache2 is not None:
        rows.append(teacher_row("teacher2 (weak)", cache2, run2, train))
    rows += setting_rows(results, plan, train)
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report, write_report(cfg, rows, plan, students))
    atomic_write_text(report.with_suffix(".json"), json.dumps({"rows": rows, "runs": results,
                                                                "seconds": round(time.time() - t0, 1),
                                                                "student_seconds": round(students, 1)}, indent=2))
    save_config(cfg, report.parent, report.stem + ".config.json")
    if cfg.plot:
        write_plot(rows, Path(cfg.plot), cfg.title)
    print(markdown_table(rows, COLUMNS))
    print(f"wrote {report}" + (f", {cfg.plot}" if cfg.plot else "") + f" in {(time.time() - t0) / 60:.1f} min")
    return rows


def main(argv: list[str]) -> int:
    compare(parse_cli(CompareConfig, ["quick=true" if a == "--quick" else a for a in argv]))
    return 0


if __name__ == "__main__":
    run_cli(main)
