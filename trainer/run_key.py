"""Run keys: a student run folder belongs to exactly one resolved config and one cache.

`make student` used to find a run folder by its name alone, so a rerun with another seed,
loss parameter or cache resumed (or re-evaluated) the old run. Each run folder now holds
run_key.json: the training-relevant settings of the run and the fingerprint of the cache
manifest, and its sha256. A folder, and a checkpoint in it, is reused only when the key
matches exactly; otherwise `on_change` decides: `new` (train in `<name>-<key[:8]>`),
`refuse` (one line naming the differing settings) or `overwrite` (delete the old run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from data.config import from_dict, to_dict
from data.io import UserError, atomic_write_text, pick_device
from pipeline.cache_reader import TeacherCache
from pipeline.cache_sync import open_cache
from trainer.checkpoint import recover_swaps
from trainer.stages import stages_for
from trainer.sweep import run_config

KEY_FILE = "run_key.json"
ON_CHANGE = ("new", "refuse", "overwrite")
# TrainConfig fields that do not change the trained student: where things are, how often to log or save,
# what to measure afterwards. Every other field (new ones too) is part of the key. The run list and the
# cache paths are replaced by the run's own spec and the caches' fingerprints; `epochs` by the stages.
UNKEYED = frozenset({"cache", "cache2", "students", "losses", "runs", "epochs", "out_dir", "resume", "on_change",
                     "log_every", "checkpoint_every", "verify", "device", "test_set", "measure_latency", "baseline",
                     "seeds", "sweep", "tensorboard", "together"})  # a run's own seed and sweep values reach it via run_config
AT_LEAST_ONE = ("batch_size", "epochs", "patience", "log_every", "together")
NOT_NEGATIVE = ("label_budget", "workers", "checkpoint_every", "max_steps_per_epoch", "weight_decay", "min_freq",
                "oov_min_freq", "oov_std")


def plan_stages(run, cfg) -> list:
    """The run's stages: its own, or its loss's schedule over the run's (else the config's) epochs; a stage without
    an lr takes the student's default_lr, so the key and the optimizer read the rate the run trains with."""
    from trainer.students import student_class

    default_lr = student_class(run.student).default_lr
    return [dataclasses.replace(st, lr=st.lr or default_lr)
            for st in run.stages or stages_for(run.loss, run.epochs or cfg.epochs, run.lr)]


def stage_params(run, stages: list) -> list[dict]:
    """Each stage's loss parameters, defaults filled in (a one-stage run takes run.loss_params too)."""
    from trainer.losses import make_params

    return [to_dict(make_params(st.loss, {**(run.loss_params if len(stages) == 1 else {}), **st.params}))
            for st in stages]


def _bad_settings(cfg) -> list[str]:
    bad = [f"{k}={getattr(cfg, k)} (must be >= 1)" for k in AT_LEAST_ONE if getattr(cfg, k) < 1]
    bad += [f"{k}={getattr(cfg, k)} (must be >= 0)" for k in NOT_NEGATIVE if getattr(cfg, k) < 0]
    bad += [f"{k}={getattr(cfg, k)} (must be > 0)" for k in ("grad_clip",) if getattr(cfg, k) <= 0]
    bad += [f"warmup_ratio={cfg.warmup_ratio} (must be in [0, 1])"] if not 0 <= cfg.warmup_ratio <= 1 else []
    bad += [f"ema_decay={cfg.ema_decay} (must be in [0, 1))"] if not 0 <= cfg.ema_decay < 1 else []
    bad += [f"on_change={cfg.on_change} (must be one of {', '.join(ON_CHANGE)})"] if cfg.on_change not in ON_CHANGE else []
    bad += [f"verify={cfg.verify} (must be true, false or full)"] if cfg.verify not in (True, False, "full") else []
    return bad


def check_config(cfg, runs: list) -> None:
    """Every setting, student and loss name of every run, before anything is read, written or trained."""
    from trainer.losses import get_loss
    from trainer.students import STUDENTS

    bad = _bad_settings(cfg)
    if bad:
        raise UserError("bad settings: " + "; ".join(bad))
    for run in runs:
        own = run_config(cfg, run)  # the run's own seed, label budget, ... (trainer/sweep.py)
        bad = _bad_settings(own) if run.overrides else []
        if bad:
            raise UserError(f"run {run.name}: bad settings: " + "; ".join(bad))
        if run.student not in STUDENTS:
            raise UserError(f"run {run.name}: unknown student {run.student!r}; known: {', '.join(sorted(STUDENTS))}")
        if run.epochs < 0 or run.lr < 0:
            raise UserError(f"run {run.name}: epochs={run.epochs}, lr={run.lr} (must be >= 0; 0: the default)")
        stages = plan_stages(run, own)
        for st in stages:
            get_loss(st.loss)  # an unknown name: "unknown loss 'hintn'; known: ..."
            if st.epochs < 1 or st.lr < 0:
                raise UserError(f"run {run.name}: stage {st.loss} has epochs={st.epochs}, lr={st.lr} "
                                "(epochs must be >= 1, lr >= 0)")
        stage_params(run, stages)
    pick_device(cfg.device)


def cache_fingerprint(cache: TeacherCache) -> str:
    """sha256 of what a cache holds: the teacher's identity (not where its folder sits), the layout, the labels
    and every shard's checksums; the manifest's names and bookkeeping do not count."""
    m = cache.manifest
    layout = dataclasses.asdict(m.layout)
    if layout["quantize"] == "none":  # as before caches could be quantised: keys of earlier runs still match
        del layout["quantize"]
    return _digest({"teacher": {k: v for k, v in dataclasses.asdict(m.teacher).items() if k != "path"},
                    "layout": layout, "max_length": m.max_length, "label_names": m.label_names,
                    "shards": sorted((dataclasses.asdict(s) for s in m.shards), key=lambda s: s["name"])})


def key_values(run, cfg, cache: TeacherCache, stages: list) -> dict:
    """Everything that decides what a run trains, as plain JSON values: the student's whole config and each
    stage's learning rate (plan_stages) as they will be used, so a changed default is a changed run."""
    from trainer.losses import get_loss
    from trainer.students import student_class

    two = cfg.cache2 and any(get_loss(st.loss).needs_second_teacher for st in stages)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in UNKEYED}
    student = to_dict(from_dict(student_class(run.student).config_class,
                                {"num_labels": cache.num_labels, **run.student_params}))
    values = {"student": run.student, "loss": run.loss, "student_params": student,
              "stages": [{**dataclasses.asdict(st), "params": p} for st, p in zip(stages, stage_params(run, stages))],
              "cache": cache_fingerprint(cache), "cache2": cache_fingerprint(TeacherCache(cfg.cache2)) if two else "",
              **settings}
    return json.loads(json.dumps(values, default=str))  # as run_key.json will hold them (tuples become lists)


def _digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _differing(folder: Path, values: dict) -> list[str] | None:
    """None: the folder is free (absent or empty) or holds this very run; else the settings that differ."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    path = folder / KEY_FILE
    if not path.is_file():
        return [f"no {KEY_FILE}: a run from before run keys"]
    old = json.loads(path.read_text()).get("values", {})
    return sorted(k for k in set(old) | set(values) if old.get(k) != values.get(k))


def claim_run_dir(run, cfg, cache: TeacherCache, stages: list, write: bool) -> tuple[Path, str]:
    """The run's folder and key under `on_change`; `write` (rank 0) creates or overwrites it, says so when
    it is not the plain `<out_dir>/<name>`, and writes run_key.json before anything else goes in."""
    values = key_values(run, cfg, cache, stages)
    key = _digest(values)
    plain = Path(cfg.out_dir) / run.name
    diff = _differing(plain, values)
    out = plain
    if diff and cfg.on_change == "refuse":
        raise UserError(f"run {run.name}: {plain} holds a run with other settings (differing: {', '.join(diff)}); "
                        "set on_change=new or on_change=overwrite, or another out_dir")
    if diff and cfg.on_change == "new":
        out = plain.with_name(f"{run.name}-{key[:8]}")
        if _differing(out, values):
            raise UserError(f"run {run.name}: {out} holds a run with other settings; move it away")
    if not write:
        return out, key
    if diff:
        print(f"{run.name}: {plain} holds a run with other settings ({', '.join(diff)}); "
              + ("deleting it (on_change=overwrite)" if out == plain else f"training in {out} (on_change=new)"))
        if out == plain:
            shutil.rmtree(plain)
    out.mkdir(parents=True, exist_ok=True)
    recover_swaps(out)
    atomic_write_text(out / KEY_FILE, json.dumps({"key": key, "values": values}, indent=1, sort_keys=True))
    return out, key


def check_run_dirs(cfg, runs: list) -> None:
    """A refusal (on_change=refuse, or a `<name>-<key>` folder taken by another run) comes before any run
    of the config trains, and nothing is written."""
    cache = open_cache(cfg.cache)
    for run in runs:
        own = run_config(cfg, run)
        claim_run_dir(run, own, cache, plan_stages(run, own), write=False)
