"""Seeds and sweeps: one config expands into named runs, and repeats of one setting are summarised.

`seeds: [0, 1, 2]` repeats every run per seed; `sweep: {loss_params.t: [2, 4], lr: [1.0e-3, 3.0e-3]}` crosses
run settings with each other and with the seeds. A run takes only the sweep keys that fit it (a `t` for
`hinton`, not for `ce`), so one grid can mix losses. TrainConfig settings (the seed, `label_budget`, ...) go
into the run's `overrides`, which `run_config` applies before the run is keyed and trained: the run key
(trainer/run_key.py) then holds the run's effective settings, so resumes and `on_change` see each run as it is.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import replace
from pathlib import Path
from statistics import fmean, stdev

from data.config import ConfigError, from_dict
from data.io import UserError, atomic_write_text
from trainer.evaluate import PREDICTIONS, markdown_table
from trainer.paired import interval_text, paired_difference

# TrainConfig fields that shape the whole plan or where it is written: never one run's own
PLAN = frozenset({"cache", "cache2", "students", "losses", "runs", "seeds", "sweep", "baseline", "out_dir"})
RUN_FIELDS = ("lr", "epochs")  # RunSpec fields a sweep sets on the run itself
PARAMS = ("loss_params", "student_params")
SEED_TAG = "s"


def run_config(cfg, run):
    """The TrainConfig one run trains with: the config's settings, then the run's `overrides` (typed)."""
    if not run.overrides:
        return cfg
    shared = sorted(set(run.overrides) & PLAN)
    if shared:
        raise UserError(f"run {run.name}: overrides cannot set {', '.join(shared)} (it applies to every run)")
    typed = from_dict(type(cfg), run.overrides, where=f"run {run.name} overrides")
    return replace(cfg, **{k: getattr(typed, k) for k in run.overrides})


def _flat(tree: dict, prefix: str = "") -> dict:
    """`{loss_params: {t: [2, 4]}}` (what `sweep.loss_params.t=[2,4]` on the command line gives) as
    `{"loss_params.t": [2, 4]}`."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def sweep_axes(cfg) -> list[tuple[str, list]]:
    """The sweep as (dotted key, values), then the seeds; every key and list checked, in one line each."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    axes = list(_flat(cfg.sweep).items())
    for key, values in axes:
        head, _, sub = key.partition(".")
        if key == "seed":
            raise UserError("sweep.seed: list repeats under `seeds: [0, 1, 2]`")
        if not (key in RUN_FIELDS or (head in PARAMS and sub and "." not in sub) or (key in fields and key not in PLAN)):
            raise UserError(f"sweep.{key}: not a run setting; sweep lr, epochs, loss_params.<name>, "
                            "student_params.<name> or a training setting such as label_budget")
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep.{key}: expected a non-empty list of values, got {values!r}")
    if len(set(cfg.seeds)) < len(cfg.seeds):
        raise UserError(f"seeds: {cfg.seeds} lists a seed twice")
    return axes + ([("seed", list(cfg.seeds))] if cfg.seeds else [])


def _owner(run, cfg, key: str):
    """The dataclass that types `key` for this run, or None when the run has no such setting."""
    from trainer.losses import get_loss
    from trainer.stages import stages_for
    from trainer.students import STUDENTS

    head, _, sub = key.partition(".")
    if key in RUN_FIELDS:
        return type(run)
    if head == "loss_params":  # a staged run (TinyBERT) takes each stage's own params, not loss_params
        stages = run.stages or stages_for(run.loss, 1)
        cls = get_loss(stages[0].loss).params_cls if len(stages) == 1 else None
    elif head == "student_params":
        cls = getattr(STUDENTS.get(run.student), "config_class", None)
    else:
        return type(cfg)
    return cls if cls and sub in {f.name for f in dataclasses.fields(cls)} else None


def _typed(cls, key: str, values: list) -> list:
    """The values as the run will read them (`1e-3` and `0.001` are one value, one name), checked as there."""
    head, _, sub = key.partition(".")
    name, where = (sub, f"sweep.{head}") if head in PARAMS else (key, "sweep")
    try:
        typed = [getattr(from_dict(cls, {name: v}, where=where), name) for v in values]
    except ConfigError:
        raise
    except ValueError as e:  # a params dataclass refusing a value (alpha outside [0, 1], ...)
        raise UserError(f"sweep.{key}: {e}") from None
    if len({json.dumps(v, sort_keys=True, default=str) for v in typed}) < len(typed):
        raise UserError(f"sweep.{key}: {values} lists a value twice")
    return typed


def _tags(keys: list[str]) -> dict:
    """Short, distinct name tags: a key's initials (alpha: a, hidden_size: hs, lr: lr), else its last part,
    else the whole key; `s` is the seed's."""
    def initials(k):
        last = k.rsplit(".", 1)[-1]
        return last if len(last) <= 2 else "".join(w[:1] for w in last.split("_"))

    keys = [k for k in keys if k != "seed"]
    for short in (initials, lambda k: k.rsplit(".", 1)[-1], lambda k: k.replace(".", "_")):
        tags = [short(k) for k in keys]
        if len(set(tags) | {SEED_TAG}) == len(tags) + 1:
            return {**dict(zip(keys, tags)), "seed": SEED_TAG}


def _text(value) -> str:
    text = value if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def _apply(run, values: dict):
    """The run with the values of one point of the sweep."""
    changes = {}
    for key, value in values.items():
        head, _, sub = key.partition(".")
        if head in PARAMS:
            changes[head] = {**changes.get(head, getattr(run, head)), sub: value}
        elif key in RUN_FIELDS:
            changes[key] = value
        else:
            changes["overrides"] = {**changes.get("overrides", run.overrides), key: value}
    return replace(run, **changes)


def expand(runs: list, cfg) -> list[tuple[object, dict]]:
    """Every run × the sweep values it takes × the seeds (the seed varies fastest), each with its name tags
    ({key: "t2"}); without seeds or a sweep, the runs as they are."""
    axes = sweep_axes(cfg)
    tags = _tags([k for k, _ in axes])
    out = []
    for run in runs:
        own = [(key, _typed(cls, key, values)) for key, values in axes if (cls := _owner(run, cfg, key))]
        for point in itertools.product(*(values for _, values in own)):
            values = dict(zip((k for k, _ in own), point))
            out.append((_apply(run, values), {k: f"{tags[k]}{_text(v)}" for k, v in values.items()}))
    unused = [k for k, _ in axes if not any(k in t for _, t in out)]
    if unused:
        raise UserError(f"sweep.{unused[0]}: no run has this setting (students: "
                        f"{', '.join(sorted({r.student for r in runs}))}; losses: {', '.join(sorted({r.loss for r in runs}))})")
    return out


def twin_tags(tags: dict) -> dict:
    """A `ce` twin's name tags: its student setting and seed, not the loss params or the lr/epochs it copied."""
    return {k: t for k, t in tags.items() if not k.startswith("loss_params.") and k not in RUN_FIELDS}


def named(runs: list[tuple[object, dict]]) -> list:
    """Each run named `<name, else student-loss>-<tags>`; two runs of one name are refused."""
    runs = [replace(r, name="-".join([r.name or f"{r.student}-{r.loss}", *tags.values()])) for r, tags in runs]
    names = [r.name for r in runs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise UserError(f"runs: more than one run is named {twice}; give them distinct `name`s")
    return runs


def setting_of(run) -> str:
    """The setting a run repeats: its name without the seed tag."""
    return run.name.removesuffix(f"-{SEED_TAG}{run.overrides['seed']}") if "seed" in run.overrides else run.name


def _stats(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": fmean(values), "sd": stdev(values) if len(values) > 1 else None, "n": len(values)}


def summarise(results: list[dict]) -> dict:
    """Repeats of a setting (runs differing only in seed) as mean ± s.d., settings ranked on mean dev accuracy,
    and the dev-chosen setting: its test accuracy is the honest estimate (the best test mean is flattered).
    A distilled setting also gets its paired difference to its `ce` twins on the same test rows, with a 95%
    bootstrap interval (trainer/paired.py)."""
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(r["setting"], []).append(r)
    rows = [{"setting": s, "n": len(rs), "runs": [r["run"] for r in rs],
             **{k: _stats([r.get(k) for r in rs]) for k in ("dev_accuracy", "test_accuracy", "vs_ce")},
             "vs_ce_ci": _paired(rs, results)}
            for s, rs in groups.items()]
    rows.sort(key=lambda row: -row["dev_accuracy"]["mean"])
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return {"settings": rows, "chosen": rows[0] if rows else None}


def _paired(repeats: list[dict], results: list[dict]) -> dict | None:
    """Each repeat against its own ce twin (same seed), paired over the test rows; None without twins."""
    by_run = {r["run"]: r for r in results}
    twins = [(r, by_run.get(r.get("ce_twin"))) for r in repeats]
    if not twins or any(t is None or "folder" not in r or "folder" not in t for r, t in twins):
        return None
    return paired_difference([(Path(r["folder"]) / PREDICTIONS, Path(t["folder"]) / PREDICTIONS) for r, t in twins])


def _cell(stats: dict | None, sign: str = "") -> str:
    if stats is None:
        return ""
    return f"{stats['mean']:{sign}.4f}" + (f" ± {stats['sd']:.4f}" if stats["sd"] is not None else "")


SUMMARY_COLUMNS = [("rank", "rank", "d"), ("setting", "setting", ""), ("n", "n", "d"), ("dev acc", "dev", ""),
                   ("test acc", "test", ""), ("vs ce", "vs_ce", ""), ("vs ce, paired [95% CI]", "paired", "")]


def summary_markdown(summary: dict) -> str:
    rows = [{**r, "dev": _cell(r["dev_accuracy"]), "test": _cell(r["test_accuracy"]), "vs_ce": _cell(r["vs_ce"], "+"),
             "paired": interval_text(r.get("vs_ce_ci"))} for r in summary["settings"]]
    lines = [markdown_table(rows, SUMMARY_COLUMNS)]
    best = summary["chosen"]
    if best:
        lines += ["", f"Chosen on dev: {best['setting']}, test accuracy {_cell(best['test_accuracy'])} "
                      f"(n = {best['n']}; mean ± s.d. over seeds)."]
    return "\n".join(lines)


def write_summary(out: Path, results: list[dict]) -> None:
    """summary.md and summary.json beside results.md."""
    summary = summarise(results)
    atomic_write_text(out / "summary.md", summary_markdown(summary) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
