"""Setting up one run: the student and the text encoder its batches need, the losses' defaults for it, and
every refusal before the first step (missing fields, damaged shards, a wrong student, no labels)."""
from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data.io import UserError
from pipeline.cache_reader import TeacherCache
from pipeline.cache_sync import local_cache_path
from trainer.loader import StreamConfig

WORD_IDS_DIR = ".word_ids"  # under train.out_dir: word students' ids, one folder per (cache, vocabulary)

if TYPE_CHECKING:  # trainer.train imports this module
    from trainer.train import RunSpec, TrainConfig

def local_caches(cfg: TrainConfig) -> TrainConfig:
    """`cache`/`cache2` given as URLs (s3://bucket/x, ...) become verified local mirrors; paths stay."""
    return replace(cfg, cache=str(local_cache_path(cfg.cache)),
                   cache2=str(local_cache_path(cfg.cache2)) if cfg.cache2 else "")


def train_sets(cfg: TrainConfig, cache: TeacherCache, specs=()) -> list[str]:
    """`train_sets`, else train + every augmented set; a run whose losses read no teacher field (`ce`) trains
    on the gold rows only: unlabelled augmented rows teach it nothing and would fill most of its batches."""
    if cfg.train_sets:
        return cfg.train_sets
    reads_teacher = not specs or any(spec.fields for spec in specs)
    augmented = cfg.use_augmented and reads_teacher
    return ["train"] + ([s for s in cache.sets() if s.startswith("aug-")] if augmented else [])


def stream_config(cfg: TrainConfig, fields, seed: int) -> StreamConfig:
    """The training stream: a full shuffle unless the stage reads token-level fields (their rows are too big
    to hold a whole epoch in memory), no length bucketing unless asked for (docs/methods.md)."""
    block_rows = StreamConfig.block_rows
    rows = cfg.shuffle_rows or (16_384 if set(fields) & {"hidden", "attention", "values"} else 0)
    return StreamConfig(batch_size=cfg.batch_size, seed=seed, bucket_by_length=cfg.bucket_by_length,
                        window_blocks=math.ceil(rows / block_rows), block_rows=block_rows)


def optimizer(model, lr: float, cfg: TrainConfig, total_steps: int):
    """AdamW and the warm-up schedule (`schedule`: linear decay to 0, or constant). The fused AdamW (one kernel
    over all tensors, CPU and CUDA) does the update of a small BERT's 15.6M weights in 0.03 s instead of 0.24 s
    a step on one CPU thread: the same update rule, equal to rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if cfg.schedule not in ("linear", "constant"):
        raise UserError(f"schedule: {cfg.schedule!r} is neither 'linear' nor 'constant'")
    warmup = int(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "constant":
        return opt, get_constant_schedule_with_warmup(opt, warmup)
    return opt, get_linear_schedule_with_warmup(opt, warmup, total_steps)


def build(run: RunSpec, cfg: TrainConfig, cache: TeacherCache, sets: list[str], encoders: dict | None = None):
    """The student (its class's `for_run`) and the text encoder its batches need (None: it reads the cached
    input_ids); `encoders` shares one word-id table among runs of the same vocabulary, and runs of any later
    process find it stored under <out_dir>/.word_ids."""
    from trainer.students import RunInputs, student_class, text_encoder

    cls = student_class(run.student)
    try:
        model = cls.for_run({"num_labels": cache.num_labels, **run.student_params}, RunInputs(cache, sets, cfg))
    except UserError as e:
        raise UserError(f"run {run.name}: {e}") from None
    return model, text_encoder(model, cache, [*sets, cfg.dev_set, cfg.test_set], encoders,
                               store=Path(cfg.out_dir) / WORD_IDS_DIR)

def with_projection(run: RunSpec, cache: TeacherCache, specs) -> RunSpec:
    """Losses comparing student vectors with the teacher's [CLS] (PKD, dynakd_supervision) or hidden states
    (TinyBERT, DistilBERT) need a learned Linear(d_S, d_T) when the widths differ: ask the student for it
    (`project_to` = the teacher width from the manifest) unless the run sets project_to itself. A word
    student always needs it for PKD (projections["pkd"]); a small BERT creates one only if d_S != d_T. A student
    on the teacher's tokens compares hidden states too."""
    from trainer.students import student_class

    fields = {"cls", "hidden"} if student_class(run.student).reads_teacher_ids else {"cls"}
    if "project_to" in run.student_params or not any(fields & set(s.fields) for s in specs):
        return run
    return replace(run, student_params={**run.student_params, "project_to": cache.manifest.teacher.hidden_size})

PKD_FAMILY = ("pkd", "dynakd_supervision")

def default_loss_params(loss: str, values: dict, student, cache: TeacherCache) -> dict:
    """A depth-1 student (BiLSTM, TextCNN, 1-layer BERT) has no layer below its top, so PKD's skip/last maps
    are empty: without a user layer_map, pair its one layer with the teacher's top non-final layer N−1
    (layer 1 of a 1-layer teacher)."""
    if loss not in PKD_FAMILY or values.get("layer_map") or getattr(student, "num_layers", 1) > 1:
        return values
    n = cache.manifest.teacher.num_layers
    return {**values, "layer_map": [[1, max(1, n - 1)]]}

def loss_error(run: RunSpec, e: Exception) -> str:
    """A loss refusing this student or cache, as one line; a missing teacher layer names the cache setting."""
    msg = f"run {run.name}: {e}"
    m = re.search(r"stored (cls|hidden|attention)_layers", str(e))
    if m:
        key = f"cache.{m.group(1)}_layers"
        msg += (f"; rebuild the teacher cache with that layer in {key} "
                f"(make teacher-cache ARGS=\"{key}=all cache.name=<new name>\")")
    return msg

def check_second_cache(cache: TeacherCache, path: str, sets: list[str]) -> None:
    """Dynamic KD joins the second teacher's cache by row id: every training row must be there."""
    second = TeacherCache(path)
    if second.label_names != cache.label_names:
        raise UserError(f"second teacher cache {path} has labels {second.label_names}, the first {cache.label_names}")
    have = set(second.row_table(None, ["row_id"]).column("row_id").to_pylist())
    need = cache.row_table(sets, ["row_id"]).column("row_id").to_pylist()
    missing = [r for r in need if r not in have]
    if missing:
        raise UserError(f"second teacher cache {path} lacks {len(missing)} of the {len(need)} training rows "
                        f"(e.g. {missing[0]}): build it over the same data and augmented sets "
                        "(make teacher-cache CONFIG=configs/teacher2.yaml)")

def preflight(run: RunSpec, cfg: TrainConfig, cache: TeacherCache, sets: list[str], specs, kind: type) -> list:
    """Every refusal before the first step: missing fields, damaged shards, wrong student, no labels."""
    from trainer.students import cached_inputs

    for spec in specs:  # what the student can give comes first: no cache of any layout would help
        if spec.token_level and not kind.reads_teacher_ids:
            raise UserError(f"loss {spec.name} compares token positions with the teacher's: use STUDENT=smallbert "
                            f"(or a student on the teacher's token ids; {run.student} sees other tokens)")
        lacking = set(spec.student_needs) - set(kind.offers)
        if lacking:
            raise UserError(f"loss {spec.name} needs the student's {', '.join(sorted(lacking))}, which student "
                            f"{run.student} does not offer (it offers {', '.join(sorted(kind.offers)) or 'logits only'})")
    fields = sorted(set().union(*(s.fields for s in specs)) | set(cached_inputs(kind)))
    cache.check_fields(fields)
    if cfg.verify:  # before anything reads a shard: damage is reported by name, never trained on
        cache.verify(sets + [cfg.dev_set, cfg.test_set], fields, full=cfg.verify == "full")
    labels = cache.row_table(["train"], ["label"]).column("label")
    for spec in specs:
        if spec.needs_second_teacher and not cfg.cache2:
            raise UserError(f"loss {spec.name} needs a second teacher's cache: set cache2=<cache dir>")
        if spec.needs_second_teacher:
            check_second_cache(cache, cfg.cache2, sets)
        if spec.needs_labels and labels.null_count == len(labels):
            raise UserError(f"loss {spec.name} needs gold labels, but the cache's train rows have none")
    return fields
