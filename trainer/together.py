"""Driving the training steps (trainer/steps.py) for one run, or for K runs in one pass over the cache.

Runs share a pass when every batch they would see is identical (`share_key`): same training sets, stream
settings (seed, batch size, shuffle window), stage epochs, text encoding and resume point. Each batch is read,
assembled and moved to the device once, then stepped by every run of the group in turn.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from trainer.distributed import join
from trainer.loader import CacheStream, WordIds, to_device
from trainer.run_key import plan_stages
from trainer.steps import RunState, StageJob, end_epoch, finish, set_up, start_stage, train_step
from trainer.students import student_class
from trainer.sweep import run_config


def open_stream(group: list[RunState], si: int) -> CacheStream:
    """The stage's training stream, read once for the whole group: the union of the fields its runs read."""
    s = group[0]
    fields = sorted(set().union(*(set(r.specs[si].fields) | set(r.eval_fields) for r in group)))
    second = any(r.specs[si].needs_second_teacher for r in group)
    return CacheStream(s.cfg.cache, s.sets, fields, s.stream_configs[si], encode=s.encode, rank=s.rank,
                       world=s.world, second_cache=s.cfg.cache2 if second else None)


def share_key(state: RunState) -> tuple:
    """Equal for runs whose every batch is the same: sets, stream settings, stage epochs, encoding, resume point."""
    cfg = state.cfg
    encode = None if state.encode is None else state.encode.key if isinstance(state.encode, WordIds) \
        else id(state.encode)
    return (cfg.cache, tuple(state.sets), repr(state.stream_configs), tuple(st.epochs for st in state.stages),
            encode, cfg.workers, cfg.max_steps_per_epoch, cfg.checkpoint_every, state.world, _resume_point(state))


def _resume_point(state: RunState) -> tuple:
    """Where each stage's checkpoint (if any, and if resuming) left off, read without loading it."""
    points = []
    for si in range(len(state.stages)):
        path = state.out / f"checkpoint-stage{si}" / "state.json"
        saved = json.loads(path.read_text()) if state.cfg.resume and path.is_file() else {}
        points.append(json.dumps([saved.get("epoch"), saved.get("stream"), saved.get("global_step")]))
    return tuple(points)


def train_group(group: list[RunState]) -> list[dict | None]:
    """Train runs with one share_key stage by stage: each epoch is one pass of one stream, every batch goes
    through every run still training (a run that stops early leaves the group)."""
    if len(group) > 1:
        print(f"{len(group)} runs in one pass over the cache: {', '.join(s.run.name for s in group)}")
    for si in range(len(group[0].stages)):
        stream = open_stream(group, si)
        jobs = []
        for state in group:
            with state.rng:
                jobs.append(start_stage(state, si, stream))
        first, active = jobs[0], list(zip(group, jobs))
        for epoch in range(first.start_epoch, first.stage.epochs):
            stream.set_epoch(epoch)
            if epoch == first.start_epoch and first.resume:
                stream.state.batches_done = {int(k): v for k, v in first.resume.items()}
            ends = run_epoch(active, stream, epoch)
            still = []
            for (state, job), (loss, seconds) in zip(active, ends):
                t0 = time.perf_counter()
                with state.rng:
                    stop = end_epoch(state, job, epoch, loss, seconds)
                state.seconds += time.perf_counter() - t0
                still += [] if stop else [(state, job)]
            active = still
            if not active:
                break
        for job in jobs:
            if job.curves:
                job.curves.close()
    results = []
    for state in group:
        with state.rng:
            results.append(finish(state))
    return results


def run_epoch(active: list[tuple[RunState, StageJob]], stream: CacheStream, epoch: int) -> list[tuple[float, float]]:
    """One pass over this rank's share of the stream, each batch read once and stepped by every run;
    returns each run's (mean loss, seconds: its own steps plus an even share of the reading)."""
    lead, job = active[0]
    cfg = lead.cfg
    for state, _ in active:
        state.model.train()
    # its own generator: creating the iterator must not draw from the global RNG (dropout's)
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                        generator=torch.Generator().manual_seed(cfg.seed + epoch))
    name = lead.run.name + (f" (+{len(active) - 1} runs)" if len(active) > 1 else "")
    bar = tqdm(loader, total=job.steps, desc=f"{name} s{job.index + 1} e{epoch + 1}", unit="batch", leave=False)
    consumed = dict(stream.state.batches_done)
    sums, seconds, n = [0.0] * len(active), [0.0] * len(active), 0
    with ExitStack() as joined:
        for state, _ in active:
            joined.enter_context(join(state.model))
        read = time.perf_counter()
        for batch in bar:
            if cfg.max_steps_per_epoch and sum(consumed.values()) >= cfg.max_steps_per_epoch:
                break
            pos = batch.pop("stream")
            consumed[pos["consumer"]] = pos["batches_done"]
            batch = to_device(batch, lead.device)
            share = (time.perf_counter() - read) / len(active)
            for i, (state, job) in enumerate(active):
                t0 = time.perf_counter()
                with state.rng:
                    sums[i] += train_step(state, job, batch, epoch, consumed)
                seconds[i] += time.perf_counter() - t0 + share
            n += 1
            if n % cfg.log_every == 0:
                bar.set_postfix(loss=f"{sums[0] / n:.4f}")
            read = time.perf_counter()
    for (state, _), spent in zip(active, seconds):
        state.seconds += spent
    return [(total / max(1, n), s) for total, s in zip(sums, seconds)]


def train_runs(runs: list, cfg) -> list[dict | None]:
    """Every run, in plan order. With `together` > 1 (one process, no torchrun), runs that would read the same
    batches are set up `together` at a time and trained in one pass per epoch."""
    k = cfg.together if int(os.environ.get("WORLD_SIZE", "1")) == 1 else 1
    results = {}
    for chunk in _chunks(runs, cfg, k):
        encoders: dict = {}
        states = [set_up(run, cfg, encoders) for run in chunk]
        groups: dict = {}
        for state in states:
            groups.setdefault(share_key(state), []).append(state)
        for group in groups.values():
            for state, result in zip(group, train_group(group)):
                results[state.run.name] = result
    return [results[run.name] for run in runs]


def _chunks(runs: list, cfg, k: int) -> list[list]:
    """Runs likely to share a stream (same seed, stream settings, epochs, kind of input), at most k per chunk, in
    order of first appearance; train_group checks the exact key once they are set up."""
    from trainer.losses import get_loss

    def likely(run) -> tuple:
        own = run_config(cfg, run)
        stages = plan_stages(run, own)
        return (own.seed, own.batch_size, own.shuffle_rows, own.bucket_by_length, tuple(st.epochs for st in stages),
                student_class(run.student).reads_teacher_ids, tuple(bool(get_loss(st.loss).fields) for st in stages))

    buckets: dict = {}
    for run in runs:
        buckets.setdefault(likely(run), []).append(run)
    return [rs[i : i + k] for rs in buckets.values() for i in range(0, len(rs), max(1, k))]
