"""Student models, the protocol the trainer asks of them, and their save/load.

A student is an nn.Module class that declares
  kind               its name in configs and student.json
  config_class       a dataclass of its settings (a run's student_params fill it; `num_labels` comes from the cache)
  reads_teacher_ids  True: batches carry the cache's input_ids/attention_mask (the teacher's tokenizer, as the
                     small BERT); False: the trainer calls `encode_texts` on each batch's text (word students)
  offers             what forward(want=...) can return besides logits: a subset of {"hidden", "attention", "values"}
  default_lr         the peak learning rate when a run sets none
and implements
  for_run(params, inputs: RunInputs) -> student      classmethod: a fresh student for a run (vocabulary, checks)
  from_saved(folder, config: dict) -> student        classmethod: the architecture of a saved one (weights follow)
  save_encoder(folder)                               writes what `encode_texts` needs (vocabulary, tokenizer)
  forward(batch, want=frozenset()) -> StudentOutput  (trainer/losses/types.py)
  encode_texts(texts, texts_b=None) -> batch dict    raw text -> what forward takes
`register_student(cls)` adds one; the built-in three are registered the same way.

A saved student folder holds model.safetensors (every parameter and buffer, shared
tensors handled), student.json (kind, config, label names) and the text encoder:
vocab.json (word students) or the HF tokenizer files (small-BERT). load_student()
needs nothing else: no teacher, no source checkpoint, no pickle.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from data.config import to_dict
from data.io import UserError, atomic_write_text
from trainer.students.bilstm import BiLSTMConfig, BiLSTMStudent
from trainer.students.smallbert import SmallBertConfig, SmallBertStudent
from trainer.students.textcnn import TextCNNConfig, TextCNNStudent
from trainer.vocab import Vocab

if TYPE_CHECKING:
    from pipeline.cache_reader import TeacherCache

STUDENTS: dict[str, type[nn.Module]] = {}
PROTOCOL = ("kind", "config_class", "reads_teacher_ids", "offers", "default_lr", "for_run", "from_saved",
            "save_encoder", "forward", "encode_texts")
WEIGHTS, META = "model.safetensors", "student.json"
_FORMAT = "distil-cache-student/1"

__all__ = [
    "STUDENTS", "BiLSTMConfig", "BiLSTMStudent", "TextCNNConfig", "TextCNNStudent", "SmallBertConfig",
    "SmallBertStudent", "RunInputs", "register_student", "student_class", "cached_inputs", "text_encoder",
    "build_student", "save_student", "load_student",
]


@dataclass
class RunInputs:
    """What a student may read to set itself up for a run: the cache, the sets it trains on, the trainer config
    (word students take the embeddings/vocabulary settings from it)."""

    cache: TeacherCache
    sets: list[str]
    train: Any  # trainer.train.TrainConfig


def register_student(cls: type[nn.Module]) -> type[nn.Module]:
    """Add a student class under `cls.kind` (usable as a decorator); refuses one that lacks part of the protocol."""
    missing = [name for name in PROTOCOL if not hasattr(cls, name)]
    if missing:
        raise TypeError(f"{cls.__name__} lacks {', '.join(missing)} of the student protocol (trainer/students)")
    if not is_dataclass(cls.config_class) or not set(cls.offers) <= {"hidden", "attention", "values"}:
        raise TypeError(f"{cls.__name__}: config_class must be a dataclass and offers a subset of "
                        "{'hidden', 'attention', 'values'}")
    STUDENTS[cls.kind] = cls
    return cls


for _builtin in (BiLSTMStudent, TextCNNStudent, SmallBertStudent):
    register_student(_builtin)


def student_class(kind: str) -> type[nn.Module]:
    try:
        return STUDENTS[kind]
    except KeyError:
        raise UserError(f"unknown student kind {kind!r}; known: {sorted(STUDENTS)}") from None


def cached_inputs(student) -> tuple[str, ...]:
    """The cache fields a student's batches read besides its losses': logits (to score it against the teacher),
    and the teacher's input_ids for a student on the teacher's tokens (a class or an instance)."""
    return ("logits", "input_ids") if student.reads_teacher_ids else ("logits",)


def text_encoder(model: nn.Module, cache: "TeacherCache | None" = None, sets=(), shared: dict | None = None,
                 store: "str | os.PathLike | None" = None):
    """What turns a batch's text into the model's inputs: None (it reads the cached input_ids), the built-in word
    students' word ids of `sets` tokenised once (trainer.loader.WordIds; one per vocabulary in `shared`, kept on
    disk under `store`), or the model's own encode_texts."""
    from trainer.loader import WordIds
    from trainer.students._word import WordStudent

    if model.reads_teacher_ids:
        return None
    if cache is not None and isinstance(model, WordStudent) and type(model).encode_texts is WordStudent.encode_texts:
        sets = list(dict.fromkeys(sets))
        key = WordIds.key_of(sets, model.vocab, model.config.max_len, model.config.pair)
        if shared is not None and key in shared:
            return shared[key]
        ids = WordIds(cache, sets, model.vocab, model.config.max_len, model.config.pair, store)
        return ids if shared is None else shared.setdefault(key, ids)
    return model.encode_texts


def build_student(kind: str, cfg, vocab: Vocab | None = None, **kwargs) -> nn.Module:
    """A fresh student: word students need `vocab` (and read cfg.embeddings, or take
    embeddings=<(V, d) tensor>); small-BERT copies/derives from cfg.source."""
    return student_class(kind).from_config(cfg, vocab=vocab, **kwargs)


def save_student(model: nn.Module, out_dir: str | os.PathLike, label_names: list[str] | None = None) -> Path:
    """Write weights, student.json and vocab/tokenizer into out_dir (other files there are kept)."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = getattr(model, "kind", None)
    if kind not in STUDENTS:
        raise ValueError(f"not a student model: {type(model).__name__}")
    if label_names is None:
        label_names = getattr(model, "label_names", None)
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS}.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_model(model, tmp, metadata={"kind": kind})
        os.replace(tmp, out / WEIGHTS)
    finally:
        Path(tmp).unlink(missing_ok=True)
    model.save_encoder(out)
    meta = {"format": _FORMAT, "kind": kind, "config": to_dict(model.config),
            "label_names": list(label_names) if label_names is not None else None}
    atomic_write_text(out / META, json.dumps(meta, indent=1, ensure_ascii=False))  # written last
    return out


def load_student(model_dir: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """A saved student in eval mode, with `label_names` set; reads only model_dir."""
    from safetensors.torch import load_model

    d = Path(model_dir)
    if not (d / META).is_file() or not (d / WEIGHTS).is_file():
        raise UserError(f"{d}: not a saved student (needs {META} and {WEIGHTS})")
    meta = json.loads((d / META).read_text(encoding="utf-8"))
    if meta.get("format") != _FORMAT:
        raise UserError(f"{d / META}: unknown format {meta.get('format')!r}")
    model = student_class(meta["kind"]).from_saved(d, meta["config"])
    load_model(model, str(d / WEIGHTS), strict=True, device=device)
    model.label_names = meta.get("label_names")
    return model.to(device).eval()
