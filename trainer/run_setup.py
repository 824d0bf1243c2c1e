"""Setting up one run: the student and the text encoder its batches need, the losses' defaults for it, and
every refusal before the first step (missing fields, damaged shards, a wrong student, no labels)."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from data.io import UserError
from pipeline.cache_reader import TeacherCache

if TYPE_CHECKING:  # trainer.train imports this module
    from trainer.train import RunSpec, TrainConfig


def build(run: RunSpec, cfg: TrainConfig, cache: TeacherCache, sets: list[str]):
    """The student and the text encoder its batches need (None: it reads the cached input_ids)."""
    from trainer.students import build_student
    from data.vectors import load_vectors
    from trainer.vocab import Vocab, load_embeddings

    params = {"num_labels": cache.num_labels, **run.student_params}
    if run.student == "smallbert":
        model = build_student("smallbert", params)
        vocab_size = model.config.hf_config.get("vocab_size")
        max_id = max((max(ids) for ids in cache.row_table(sets, ["input_ids"]).column("input_ids").to_pylist()),
                     default=0)
        if max_id >= vocab_size:
            raise UserError(f"student {run.name}: its tokenizer has {vocab_size} ids but the cache holds id {max_id}: "
                            "a small-BERT student must share the teacher's tokenizer")
        return model, None
    rows = cache.row_table(sets, ["set", "text", "text_b"])
    a, b, in_set = (rows.column(c).to_pylist() for c in ("text", "text_b", "set"))
    params.setdefault("pair", any(b))
    texts = a + [t for t in b if t]
    original = [t for t, s in zip(a + b, in_set * 2) if t and not s.startswith("aug-")]  # before augmentation
    vectors = load_vectors(cfg.embeddings, "embeddings")
    vocab = Vocab.build(texts, min_freq=cfg.min_freq, pretrained=vectors.key_to_index, oov_min_freq=cfg.oov_min_freq,
                        original=original)
    embeddings, missing = load_embeddings(vocab, vectors, oov_std=cfg.oov_std)
    print(f"{run.name}: vocabulary {len(vocab)} words, {missing} without a pretrained vector")
    model = build_student(run.student, params, vocab=vocab, embeddings=torch.as_tensor(embeddings))
    return model, model.encode_texts


def with_projection(run: RunSpec, cache: TeacherCache, specs) -> RunSpec:
    """Losses comparing student vectors with the teacher's [CLS] (PKD, dynakd_supervision) or hidden states
    (TinyBERT, DistilBERT) need a learned Linear(d_S, d_T) when the widths differ: ask the student for it
    (`project_to` = the teacher width from the manifest) unless the run sets project_to itself. A word
    student always needs it for PKD (projections["pkd"]); a small BERT creates one only if d_S != d_T."""
    fields = {"cls"} if run.student != "smallbert" else {"cls", "hidden"}
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


def preflight(run: RunSpec, cfg: TrainConfig, cache: TeacherCache, sets: list[str], specs, is_bert: bool) -> list:
    """Every refusal before the first step: missing fields, damaged shards, wrong student, no labels."""
    fields = sorted(set().union(*(s.fields for s in specs)) | {"logits"} | ({"input_ids"} if is_bert else set()))
    cache.check_fields(fields)
    if cfg.verify:  # before anything reads a shard: damage is reported by name, never trained on
        cache.verify(sets + [cfg.dev_set, cfg.test_set], fields)
    labels = cache.row_table(["train"], ["label"]).column("label")
    for spec in specs:
        if spec.token_level and not is_bert:
            raise UserError(f"loss {spec.name} compares token positions with the teacher's: use STUDENT=smallbert "
                            f"(word-level students see other tokens)")
        if spec.needs_second_teacher and not cfg.cache2:
            raise UserError(f"loss {spec.name} needs a second teacher's cache: set cache2=<cache dir>")
        if spec.needs_second_teacher:
            check_second_cache(cache, cfg.cache2, sets)
        if spec.needs_labels and labels.null_count == len(labels):
            raise UserError(f"loss {spec.name} needs gold labels, but the cache's train rows have none")
    return fields
