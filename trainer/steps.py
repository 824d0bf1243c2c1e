"""The steps of training students from a cache, in the torchtune manner: `set_up` (everything before the first
step), `start_stage`, `train_step` (one optimizer step on one batch), `end_epoch` (dev, best student,
checkpoint, early stop) and `finish` (the best student reloaded and tested). trainer/together.py drives them,
for one run or for K runs in one pass over the cache. Each run keeps its own model, optimizer, schedule,
checkpoint, logs and random state (`RngSlot` swaps the global RNGs in around each of its steps), so it ends with
the weights it gets when trained alone with the same seed (tests/test_together.py).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from data.config import save_config
from data.faults import crash_point
from data.io import UserError, pick_device
from pipeline.cache_reader import TeacherCache
from pipeline.cache_sync import open_cache
from trainer.checkpoint import load_checkpoint, save_best, save_checkpoint
from trainer.curves import log_epoch, log_step, open_curves
from trainer.distributed import barrier, broadcast_flag, wrap
from trainer.distributed import setup as dist_setup
from trainer.evaluate import evaluate, finish_run, write_csv
from trainer.loader import CacheStream, StreamConfig
from trainer.run_key import claim_run_dir, plan_stages
from trainer.run_setup import (build, default_loss_params, local_caches, loss_error, optimizer, preflight, stream_config,
                                train_sets, with_projection)
from trainer.students import cached_inputs, student_class
from trainer.sweep import run_config


class RngSlot:
    """One run's Python, NumPy and torch random states (CUDA too on a CUDA device). `with slot:` puts them in
    place of the global ones and keeps what the block drew, so runs trained side by side draw what each would
    draw alone (dropout masks, and the RNG states their checkpoints save)."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.state = self._get()

    def _get(self):
        return (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
                torch.cuda.get_rng_state(self.device) if self.device is not None else None)

    def __enter__(self):
        py, npy, cpu, cuda = self.state
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def __exit__(self, *exc) -> None:
        self.state = self._get()


@dataclass
class RunState:
    """One run from set-up to its result: what lives across its stages."""

    run: object  # RunSpec (with the learned projection its losses need)
    cfg: object  # the run's own TrainConfig (seed, sweep values, local cache paths)
    cache: TeacherCache
    stages: list
    specs: list  # each stage's loss
    sets: list[str]  # training sets
    stream_configs: list[StreamConfig]  # each stage's
    out: Path
    key: str
    student: torch.nn.Module
    model: torch.nn.Module  # the student, DDP-wrapped under torchrun
    encode: object  # None | WordIds | the student's encode_texts
    device: torch.device
    rank: int
    world: int
    gold: set | None  # train row ids whose label is kept (label_budget)
    rng: RngSlot
    eval_fields: tuple
    log: object = None  # rank 0's metrics.jsonl
    history: list = field(default_factory=list)
    best: dict | None = None
    stale: int = 0  # final-stage epochs without a better dev accuracy
    global_step: int = 0
    seconds: float = 0.0  # this run's own training and evaluation time (a shared stream's reading split evenly)

    @property
    def lead(self) -> bool:
        return self.rank == 0


@dataclass
class StageJob:
    """One stage of one run: its loss, optimizer and schedule, and where a checkpoint of it left off."""

    index: int
    stage: object
    spec: object
    params: object
    opt: torch.optim.Optimizer
    sched: object
    steps: int  # batches per epoch on this rank
    ckpt: Path
    start_epoch: int = 0
    resume: dict | None = None  # the stream position a mid-epoch checkpoint saved
    curves: object = None  # rank 0's TensorBoard writer (trainer/curves.py)
    average: AveragedModel | None = None  # the moving average of the weights (ema_decay > 0)

    def judged(self, student: torch.nn.Module) -> torch.nn.Module:
        """The weights dev, best/ and test see: the average when the run keeps one."""
        return self.average.module if self.average is not None else student


def set_up(run, cfg, encoders: dict | None = None) -> RunState:
    """Everything before the first step: the run's own settings and seed, every refusal, its folder, the student
    and its text encoder (one per vocabulary in `encoders`, shared by the runs set up with it)."""
    from trainer.losses import get_loss

    cfg = run_config(cfg, run)  # the run's own seed, label budget, ... (seeds and sweeps)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    rank, world, device = dist_setup(pick_device(cfg.device))
    cfg = local_caches(cfg)  # a no-op for local paths (train_all has pulled URLs already)
    cache = open_cache(cfg.cache)
    stages = plan_stages(run, cfg)
    specs = [get_loss(st.loss) for st in stages]
    sets = train_sets(cfg, cache, specs)
    kind = student_class(run.student)
    preflight(run, cfg, cache, sets, specs, kind)
    out, key = claim_run_dir(run, cfg, cache, stages, write=rank == 0)  # keyed by the run as given
    barrier(world)  # rank 0 has made (or overwritten) the folder
    run = with_projection(run, cache, specs)
    student, encode = build(run, cfg, cache, sets, encoders)
    student.to(device)
    eval_fields = tuple(cached_inputs(kind))
    streams = [stream_config(cfg, set(spec.fields) | set(eval_fields), cfg.seed + si) for si, spec in enumerate(specs)]
    state = RunState(run, cfg, cache, stages, specs, sets, streams, out, key, student, wrap(student, world, device),
                     encode, device, rank, world, _gold_ids(cache, cfg.label_budget) if cfg.label_budget else None,
                     RngSlot(device), eval_fields)
    if state.lead:
        state.log = open(out / "metrics.jsonl", "a")
        save_config(run, out, "run.json")
    return state


def stage_loss_params(state: RunState, si: int):
    """A stage's loss parameters: run.loss_params fill a one-stage run, staged runs take each stage's own."""
    from trainer.losses import make_params

    stage = state.stages[si]
    return make_params(stage.loss, default_loss_params(
        stage.loss, {**(state.run.loss_params if len(state.stages) == 1 else {}), **stage.params},
        state.student, state.cache))


def start_stage(state: RunState, si: int, stream: CacheStream) -> StageJob:
    """A stage's loss, optimizer and schedule, restored from its checkpoint when one of this run is there."""
    cfg, stage = state.cfg, state.stages[si]
    params = stage_loss_params(state, si)
    steps = math.ceil(stream.num_rows / cfg.batch_size / state.world)
    steps = min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps
    opt, sched = optimizer(state.model, stage.lr, cfg, steps * stage.epochs)
    job = StageJob(si, stage, state.specs[si], params, opt, sched, steps, state.out / f"checkpoint-stage{si}")
    if cfg.ema_decay:  # each stage averages its own steps: a TinyBERT prediction stage starts from stage 1's end
        job.average = AveragedModel(state.student, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    saved = load_checkpoint(job.ckpt, state.student, opt, sched, state.key, job.average) if cfg.resume else None
    state.stale = 0
    if saved:
        job.start_epoch, job.resume = saved["epoch"], saved["stream"]
        state.best, state.history, state.global_step = saved["best"], saved["history"], saved["global_step"]
        state.stale = saved.get("stale", 0)
        print(f"{state.run.name}: resuming stage {si + 1} at epoch {job.start_epoch + 1}, "
              f"{sum(job.resume.values())} batches into it")
    job.curves = open_curves(state.out, cfg, saved, stage.epochs) if state.lead else None
    return job


def save_stage(state: RunState, job: StageJob, epoch: int, consumed: dict) -> None:
    """The stage's checkpoint: weights, optimizer, schedule, RNGs, and the stream position `consumed`."""
    save_checkpoint(job.ckpt, state.student, job.opt, job.sched,
                    {"epoch": epoch, "stream": consumed, "best": state.best, "history": state.history,
                     "global_step": state.global_step, "stale": state.stale}, state.key, job.average)


def train_step(state: RunState, job: StageJob, batch: dict, epoch: int, consumed: dict) -> float:
    """One optimizer step on one batch (already on the device); returns the loss."""
    cfg = state.cfg
    if state.gold is not None:
        batch = {**batch, "labels": _mask_labels(batch, state.gold)}
    try:
        loss, parts = job.spec.fn(state.model(batch, frozenset(job.spec.student_needs)), batch, job.params,
                                  {"epoch": epoch, "step": state.global_step})
    except ValueError as e:  # the loss refuses this student / cache layout: one line, not a traceback
        raise UserError(loss_error(state.run, e)) from e
    job.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    job.opt.step()
    job.sched.step()
    if job.average is not None:
        job.average.update_parameters(state.student)
    state.global_step += 1
    if state.world == 1 and cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
        save_stage(state, job, epoch, consumed)
    crash_point("student-step")
    if state.global_step % cfg.log_every == 0 and state.log:
        state.log.write(json.dumps({"run": state.run.name, "stage": job.index + 1, "epoch": epoch + 1,
                                    "step": state.global_step, "loss": loss.item(),
                                    **{k: float(v) for k, v in parts.items()}}) + "\n")
        log_step(job.curves, state.global_step, parts, job.opt.param_groups[0]["lr"])
    return loss.item()


def end_epoch(state: RunState, job: StageJob, epoch: int, loss: float, seconds: float) -> bool:
    """Rank 0 measures dev, keeps the best student of the final stage and checkpoints the epoch's end; returns
    whether the run stops early (`patience` final-stage epochs without a better dev accuracy)."""
    cfg, final, stop = state.cfg, job.index == len(state.stages) - 1, False
    if state.lead:
        dev = evaluate(job.judged(state.student), cfg.cache, [cfg.dev_set], state.eval_fields, state.encode,
                       state.cache.num_labels, state.device)
        record = {"stage": job.index + 1, "epoch": epoch + 1, "train_loss": loss, "epoch_seconds": round(seconds, 2),
                  **{f"dev_{k}": v for k, v in dev.items()}}
        state.history.append(record)
        state.log.write(json.dumps({"run": state.run.name, **record}) + "\n")
        state.log.flush()
        log_epoch(job.curves, state.global_step, record)
        print(f"{state.run.name} stage {job.index + 1} epoch {epoch + 1}: loss {loss:.4f} dev acc "
              f"{dev['accuracy']:.4f} F1 {dev['macro_f1']:.4f} ({seconds:.1f} s)")
        if final and (state.best is None or dev["accuracy"] > state.best["dev_accuracy"]):
            state.best, state.stale = {"stage": job.index + 1, "epoch": epoch + 1, "dev_accuracy": dev["accuracy"],
                                       "dev_macro_f1": dev["macro_f1"]}, 0
            save_best(job.judged(state.student), state.out / "best", state.cache.label_names)
        elif final:
            state.stale += 1
        save_stage(state, job, epoch + 1, {})
        stop = final and state.stale >= cfg.patience
        if stop:
            print(f"{state.run.name}: early stop, no better dev accuracy for {state.stale} epochs")
    stop = broadcast_flag(stop, state.world)
    if not stop:
        barrier(state.world)
    return stop


def finish(state: RunState) -> dict | None:
    """The best student reloaded as a user would and measured on the test rows (rank 0; others return None)."""
    if not state.lead:
        return None
    state.log.close()
    write_csv(state.out / "metrics.csv", state.history)
    return finish_run(state.run, state.cfg, state.cache, state.out, state.best, state.seconds, state.history,
                      state.device, state.encode)


def _gold_ids(cache: TeacherCache, budget: int) -> set[str]:
    """The train rows whose gold label is kept: the first `budget` labelled rows by row id."""
    rows = cache.row_table(["train"], ["row_id", "label"])
    ids = sorted(r for r, y in zip(rows.column("row_id").to_pylist(), rows.column("label").to_pylist())
                 if y is not None)
    return set(ids[:budget])


def _mask_labels(batch: dict, gold: set[str]) -> torch.Tensor:
    labels = batch["labels"]
    keep = torch.tensor([rid in gold for rid in batch["row_id"]], device=labels.device)
    return torch.where(keep, labels, torch.full_like(labels, -100))
