"""Setting up one run: the student and the text encoder its batches need, the losses' defaults for it, and
every refusal before the first step (missing fields, damaged shards, a wrong student, no labels)."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from data.io import UserError
from pipeline.cache_reader import TeacherCache

if TYPE_CHECKING:  # trainer.train imports this module
    from trainer.train import RunSpec, TrainConfig

def build(run: RunSpec, cfg: TrainConfig, cache: TeacherCache, sets: list[str]):
    """The student (its class's `for_run`) and the text encoder its batches need (None: it reads the cached
    input_ids)."""
    from trainer.students import RunInputs, student_class, text_encoder

    cls = student_class(run.student)
    try:
        model = cls.for_run({"num_labels": cache.num_labels, **run.student_params}, RunInputs(cache, sets, cfg))
    except UserError as e:
        raise UserError(f"run {run.name}: {e}") from None
    return model, text_encoder(model, cache, [*sets, cfg.dev_set, cfg.test_set])

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
