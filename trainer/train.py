"""`python -m trainer.train`: train students from a teacher cache (the teacher is never loaded).

One command trains every (student, loss) run of the config from the same cache and
prints one comparison table. Each run keeps its best-on-dev student (safetensors +
JSON), a resumable checkpoint, metrics.jsonl/metrics.csv and its resolved config.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.config import parse_cli, save_config
from data.faults import crash_point
from data.io import UserError, atomic_write_text, pick_device, run_cli
from pipeline.cache_reader import TeacherCache
from pipeline.cache_sync import local_cache_path, open_cache
from trainer.checkpoint import load_checkpoint, save_best, save_checkpoint
from trainer.curves import log_epoch, log_step, open_curves
from trainer.evaluate import evaluate, finish_run, result_table, to_device, write_csv
from trainer.distributed import barrier, broadcast_flag, cleanup, join, wrap
from trainer.distributed import setup as dist_setup
from trainer.loader import CacheStream, StreamConfig
from trainer.run_key import check_config, check_run_dirs, claim_run_dir, plan_stages
from trainer.run_setup import build, default_loss_params, loss_error, preflight, with_projection
from trainer.stages import Stage
from trainer.students import cached_inputs, student_class
from trainer.sweep import expand, named, run_config, setting_of, summarise, summary_markdown, twin_tags, write_summary


@dataclass
class RunSpec:
    """One student trained with one loss (or a staged schedule)."""

    student: str = "bilstm"
    loss: str = "hinton"
    name: str = ""  # default: <student>-<loss>
    student_params: dict = field(default_factory=dict)  # fields of the student's config dataclass
    loss_params: dict = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)  # empty: the loss's own schedule (one stage, or TinyBERT's two)
    epochs: int = 0  # 0: TrainConfig.epochs
    lr: float = 0.0  # 0: the student's default_lr (BiLSTM 2e-3, TextCNN 1e-3, small-BERT 5e-5)
    overrides: dict = field(default_factory=dict)  # TrainConfig settings of this run only (seed, label_budget, ...)


@dataclass
class TrainConfig:
    cache: str = "work/cache/minilm-tweets"
    cache2: str = ""  # a second teacher's cache of the same rows (Dynamic KD)
    students: list[str] = field(default_factory=lambda: ["bilstm"])  # grid: students × losses
    losses: list[str] = field(default_factory=lambda: ["hinton"])
    runs: list[RunSpec] = field(default_factory=list)  # explicit runs (replace the grid)
    seeds: list[int] = field(default_factory=list)  # repeat every run per seed (empty: just `seed`); trainer/sweep.py
    sweep: dict = field(default_factory=dict)  # run setting -> values, crossed: {loss_params.t: [2, 4], lr: [...]}
    train_sets: list[str] = field(default_factory=list)  # empty: train + every aug-* set
    use_augmented: bool = True
    label_budget: int = 0  # >0: keep gold labels of only this many train rows (few-labels regime)
    dev_set: str = "dev"
    test_set: str = "test"
    epochs: int = 5
    batch_size: int = 64
    weight_decay: float = 0.0
    schedule: str = "linear"  # linear: warm-up then linear decay to 0 | constant: warm-up then a flat lr
    warmup_ratio: float = 0.05
    shuffle_rows: int = 0  # training stream's shuffle buffer; 0: the whole stream for row-level losses,
    #                        16,384 rows for stages reading token-level fields (hidden/attention/values)
    bucket_by_length: bool = False  # length-homogeneous batches: ~20% faster epochs, lower accuracy
    grad_clip: float = 5.0
    patience: int = 3  # epochs without a better dev accuracy before stopping
    seed: int = 0
    embeddings: str = "glove50"  # word students: glove50 (shipped) or a GloVe/word2vec file
    min_freq: int = 1
    oov_min_freq: int = 2  # a word without a pretrained vector needs this many occurrences in the rows before
    #                        augmentation, else it reads <unk> (docs/methods.md)
    oov_std: float = 0.0  # std of the random rows of words without a vector (and <unk>); 0: the vectors' std
    workers: int = 0  # DataLoader worker processes
    verify: bool | str = True  # true: checksum the shards whose files changed since last verified | full: all | false
    device: str = "auto"
    out_dir: str = "work/students"
    resume: bool = True  # only ever a checkpoint of this very run (same run key, trainer/run_key.py)
    on_change: str = "new"  # <out_dir>/<name> holds a run with other settings: new (<name>-<key>) | refuse | overwrite
    log_every: int = 50
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (0: epoch ends only)
    max_steps_per_epoch: int = 0  # 0 = whole epoch (benchmarks and tests cut it)
    measure_latency: bool = True
    baseline: bool = True  # add each distilled student's plain `ce` twin (gold rows only) to the table
    tensorboard: bool = True  # training curves in <run>/tensorboard/ (trainer/curves.py)


def local_caches(cfg: TrainConfig) -> TrainConfig:
    """`cache`/`cache2` given as URLs (s3://bucket/x, ...) become verified local mirrors; paths stay."""
    return replace(cfg, cache=str(local_cache_path(cfg.cache)),
                   cache2=str(local_cache_path(cfg.cache2)) if cfg.cache2 else "")


def plan_runs(cfg: TrainConfig) -> list[RunSpec]:
    """The grid or the explicit runs × the seeds and sweep (trainer/sweep.py); with `baseline`, each distilled
    student gets its plain `ce` twin (same student, params and seed, gold rows only) first, so the table shows
    what distillation bought."""
    runs = expand(cfg.runs or [RunSpec(student=s, loss=l) for s in cfg.students for l in cfg.losses], cfg)
    if cfg.baseline:
        planned = []
        for r, tags in runs:
            twin = RunSpec(student=r.student, loss="ce", student_params=dict(r.student_params), epochs=r.epochs,
                           lr=r.lr, overrides=dict(r.overrides),
                           name="" if not r.student_params else f"{r.name or r.student}-ce")
            if r.loss != "ce" and not any(_same_student(q, twin) and q.loss == "ce" for q, _ in runs + planned):
                planned.append((twin, twin_tags(tags)))
            planned.append((r, tags))
        runs = planned
    return named(runs)


def _same_student(a: RunSpec, b: RunSpec) -> bool:
    """Same student, params and per-run settings (seed, label budget): a twin, whatever the loss."""
    return a.student == b.student and a.student_params == b.student_params and a.overrides == b.overrides


def train_sets(cfg: TrainConfig, cache: TeacherCache, specs=()) -> list[str]:
    """`train_sets`, else train + every augmented set; a run whose losses read no teacher field (`ce`) trains
    on the gold rows only: unlabelled augmented rows teach it nothing and would fill most of its batches."""
    if cfg.train_sets:
        return cfg.train_sets
    reads_teacher = not specs or any(spec.fields for spec in specs)
    augmented = cfg.use_augmented and reads_teacher
    return ["train"] + ([s for s in cache.sets() if s.startswith("aug-")] if augmented else [])


def _optimizer(model, lr: float, cfg: TrainConfig, total_steps: int):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay)
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if cfg.schedule not in ("linear", "constant"):
        raise UserError(f"schedule: {cfg.schedule!r} is neither 'linear' nor 'constant'")
    warmup = int(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "constant":
        return opt, get_constant_schedule_with_warmup(opt, warmup)
    return opt, get_linear_schedule_with_warmup(opt, warmup, total_steps)


def stream_config(cfg: TrainConfig, fields, seed: int) -> StreamConfig:
    """The training stream: a full shuffle unless the stage reads token-level fields (their rows are too big
    to hold a whole epoch in memory), no length bucketing unless asked for (docs/methods.md)."""
    block_rows = StreamConfig.block_rows
    rows = cfg.shuffle_rows or (16_384 if set(fields) & {"hidden", "attention", "values"} else 0)
    return StreamConfig(batch_size=cfg.batch_size, seed=seed, bucket_by_length=cfg.bucket_by_length,
                        window_blocks=math.ceil(rows / block_rows), block_rows=block_rows)


@dataclass
class Job:
    """What one stage's epochs share."""

    run: RunSpec
    cfg: TrainConfig
    model: torch.nn.Module
    spec: object
    params: object
    stream: CacheStream
    opt: torch.optim.Optimizer
    sched: object
    device: torch.device
    gold: set | None
    log: object
    steps: int
    world: int
    curves: object = None  # rank 0's TensorBoard writer (trainer/curves.py); None: not written


def run_epoch(job: Job, epoch: int, stage: int, consumed: dict, global_step: int, save_mid) -> tuple[float, int, int]:
    """One pass over this rank's share of the stream; returns (mean loss, batches, global step)."""
    cfg, model, want = job.cfg, job.model, frozenset(job.spec.student_needs)
    model.train()
    # its own generator: creating the iterator must not draw from the global RNG (dropout's),
    # or a run resumed mid-epoch would see other dropout masks than an uninterrupted one
    loader = DataLoader(job.stream, batch_size=None, num_workers=cfg.workers,
                        generator=torch.Generator().manual_seed(cfg.seed + epoch))
    bar = tqdm(loader, total=job.steps, desc=f"{job.run.name} s{stage + 1} e{epoch + 1}", unit="batch", leave=False)
    loss_sum, n = 0.0, 0
    with join(model):
        for batch in bar:
            if cfg.max_steps_per_epoch and sum(consumed.values()) >= cfg.max_steps_per_epoch:
                break
            pos = batch.pop("stream")
            if job.gold is not None:
                batch["labels"] = _mask_labels(batch, job.gold)
            batch = to_device(batch, job.device)
            try:
                loss, parts = job.spec.fn(model(batch, want), batch, job.params, {"epoch": epoch, "step": global_step})
            except ValueError as e:  # the loss refuses this student / cache layout: one line, not a traceback
                raise UserError(loss_error(job.run, e)) from e
            job.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            job.opt.step()
            job.sched.step()
            consumed[pos["consumer"]] = pos["batches_done"]
            global_step += 1
            loss_sum, n = loss_sum + loss.item(), n + 1
            if job.world == 1 and cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                save_mid(epoch, consumed, global_step)
            crash_point("student-step")
            if global_step % cfg.log_every == 0 and job.log:
                job.log.write(json.dumps({"run": job.run.name, "stage": stage + 1, "epoch": epoch + 1,
                                          "step": global_step, "loss": loss.item(),
                                          **{k: float(v) for k, v in parts.items()}}) + "\n")
                log_step(job.curves, global_step, parts, job.opt.param_groups[0]["lr"])
                bar.set_postfix(loss=f"{loss_sum / n:.4f}")
    return loss_sum / max(1, n), n, global_step


def train_run(run: RunSpec, cfg: TrainConfig) -> dict | None:
    """Train one student (every stage), keep the best on dev, measure it. Rank 0 returns the result."""
    from trainer.losses import get_loss, make_params

    cfg = run_config(cfg, run)  # the run's own seed, label budget, ... (seeds and sweeps)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    rank, world, device = dist_setup(pick_device(cfg.device))
    lead = rank == 0
    cfg = local_caches(cfg)  # a no-op for local paths (train_all has pulled URLs already)
    cache = open_cache(cfg.cache)
    stages = plan_stages(run, cfg)
    specs = [get_loss(st.loss) for st in stages]
    sets = train_sets(cfg, cache, specs)
    kind = student_class(run.student)
    preflight(run, cfg, cache, sets, specs, kind)
    out, key = claim_run_dir(run, cfg, cache, stages, write=lead)  # keyed by the run as given
    barrier(world)  # rank 0 has made (or overwritten) the folder
    run = with_projection(run, cache, specs)
    student, encode = build(run, cfg, cache, sets)
    student.to(device)
    model = wrap(student, world, device)
    eval_fields = cached_inputs(kind)
    history, best, t_start, global_step = [], None, time.time(), 0
    gold = _gold_ids(cache, cfg.label_budget) if cfg.label_budget else None
    log = open(out / "metrics.jsonl", "a") if lead else None
    if lead:
        save_config(run, out, "run.json")
    for si, stage in enumerate(stages):
        spec = specs[si]  # run.loss_params fill a one-stage run; staged runs take each stage's own params
        params = make_params(stage.loss, default_loss_params(
            stage.loss, {**(run.loss_params if len(stages) == 1 else {}), **stage.params}, student, cache))
        stream = CacheStream(cfg.cache, sets, sorted(set(spec.fields) | set(eval_fields)),
                             stream_config(cfg, set(spec.fields) | set(eval_fields), cfg.seed + si), encode=encode,
                             rank=rank, world=world, second_cache=cfg.cache2 if spec.needs_second_teacher else None)
        steps = math.ceil(stream.num_rows / cfg.batch_size / world)
        steps = min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps
        opt, sched = _optimizer(model, stage.lr, cfg, steps * stage.epochs)
        job = Job(run, cfg, model, spec, params, stream, opt, sched, device, gold, log, steps, world)
        ckpt = out / f"checkpoint-stage{si}"
        state = load_checkpoint(ckpt, student, opt, sched, key) if cfg.resume else None
        start_epoch, stale = (state["epoch"], state.get("stale", 0)) if state else (0, 0)
        if state:
            best, history, global_step = state["best"], state["history"], state["global_step"]
            print(f"{run.name}: resuming stage {si + 1} at epoch {start_epoch + 1}, "
                  f"{sum(state['stream'].values())} batches into it")
        job.curves = open_curves(out, cfg, state, stage.epochs) if lead else None

        def save_mid(epoch, consumed, step):
            save_checkpoint(ckpt, student, opt, sched, {"epoch": epoch, "stream": consumed, "best": best,
                                                         "history": history, "global_step": step, "stale": stale},
                            key)

        for epoch in range(start_epoch, stage.epochs):
            stream.set_epoch(epoch)
            if state and epoch == start_epoch:
                stream.state.batches_done = {int(k): v for k, v in state["stream"].items()}
            consumed = dict(stream.state.batches_done)
            t0 = time.time()
            loss, n, global_step = run_epoch(job, epoch, si, consumed, global_step, save_mid)
            epoch_seconds = time.time() - t0
            final_stage, stop = si == len(stages) - 1, False
            if lead:
                dev = evaluate(student, cfg.cache, [cfg.dev_set], eval_fields, encode, cache.num_labels, device)
                record = {"stage": si + 1, "epoch": epoch + 1, "train_loss": loss, "epoch_seconds": round(epoch_seconds, 2),
                          **{f"dev_{k}": v for k, v in dev.items()}}
                history.append(record)
                log.write(json.dumps({"run": run.name, **record}) + "\n")
                log.flush()
                log_epoch(job.curves, global_step, record)
                print(f"{run.name} stage {si + 1} epoch {epoch + 1}: loss {loss:.4f} dev acc {dev['accuracy']:.4f} "
                      f"F1 {dev['macro_f1']:.4f} ({epoch_seconds:.1f} s)")
                if final_stage and (best is None or dev["accuracy"] > best["dev_accuracy"]):
                    best, stale = {"stage": si + 1, "epoch": epoch + 1, "dev_accuracy": dev["accuracy"],
                                   "dev_macro_f1": dev["macro_f1"]}, 0
                    save_best(student, out / "best", cache.label_names)
                elif final_stage:
                    stale += 1
                save_mid(epoch + 1, {}, global_step)
                stop = final_stage and stale >= cfg.patience
                if stop:
                    print(f"{run.name}: early stop, no better dev accuracy for {stale} epochs")
            if broadcast_flag(stop, world):
                break
            barrier(world)
        if job.curves:
            job.curves.close()
    if not lead:
        return None
    log.close()
    write_csv(out / "metrics.csv", history)
    return finish_run(run, cfg, cache, out, best, time.time() - t_start, history, device)


def _gold_ids(cache: TeacherCache, budget: int) -> set[str]:
    """The train rows whose gold label is kept: the first `budget` labelled rows by row id."""
    rows = cache.row_table(["train"], ["row_id", "label"])
    ids = sorted(r for r, y in zip(rows.column("row_id").to_pylist(), rows.column("label").to_pylist())
                 if y is not None)
    return set(ids[:budget])


def _mask_labels(batch: dict, gold: set[str]) -> torch.Tensor:
    keep = torch.tensor([rid in gold for rid in batch["row_id"]])
    return torch.where(keep, batch["labels"], torch.full_like(batch["labels"], -100))


def train_all(cfg: TrainConfig) -> list[dict]:
    runs = plan_runs(cfg)
    check_config(cfg, runs)  # every run's names and settings, before anything is written
    local = local_caches(cfg)  # pull remote caches once for every run
    check_run_dirs(local, runs)
    results = [train_run(run, local) for run in runs]
    cleanup()  # torchrun: every rank is past its last collective
    if results and results[0] is None:  # not rank 0: rank 0 writes the table
        return []
    for run, result in zip(runs, results):  # what distillation bought: test accuracy minus the ce twin's
        twin = next((t for q, t in zip(runs, results) if q.loss == "ce" and _same_student(q, run)), None)
        result["vs_ce"] = result["test_accuracy"] - twin["test_accuracy"] if twin and run.loss != "ce" else None
        result["setting"] = setting_of(run)  # what repeats over seeds share
    out = Path(cfg.out_dir)
    table = result_table(results)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    save_config(cfg, out)
    if cfg.seeds or cfg.sweep:
        write_summary(out, results)
    return results


def main(argv: list[str]) -> int:
    cfg = parse_cli(TrainConfig, argv)
    results = train_all(cfg)
    if not results:  # a rank other than 0
        return 0
    print(result_table(results))
    if cfg.seeds or cfg.sweep:
        print("\n" + summary_markdown(summarise(results)))
    if cfg.measure_latency:  # the table's latency is eager PyTorch; the serving forms and the teacher are one step away
        print(f"\nlatency as served (TorchScript, ONNX, int8) beside the teacher: python -m trainer.latency "
              f"{Path(cfg.out_dir) / results[-1]['run']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
