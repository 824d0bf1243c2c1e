"""Student models and their save/load.

Every student is an nn.Module with `forward(batch, want=frozenset()) -> StudentOutput`,
a dataclass `config`, `from_config(cfg, vocab=None, ...)` and `encode_texts(texts, texts_b)`.

A saved student folder holds model.safetensors (every parameter and buffer, shared
tensors handled), student.json (kind, config, label names) and the text encoder:
vocab.json (word students) or the HF tokenizer files (small-BERT). load_student()
needs nothing else: no teacher, no source checkpoint, no pickle.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

from data.config import to_dict
from data.io import UserError, atomic_write_text
from trainer.students.bilstm import BiLSTMConfig, BiLSTMStudent
from trainer.students.smallbert import SmallBertConfig, SmallBertStudent
from trainer.students.textcnn import TextCNNConfig, TextCNNStudent
from trainer.vocab import Vocab

STUDENTS: dict[str, type[nn.Module]] = {
    "bilstm": BiLSTMStudent,
    "textcnn": TextCNNStudent,
    "smallbert": SmallBertStudent,
}
WEIGHTS, META, VOCAB = "model.safetensors", "student.json", "vocab.json"
_FORMAT = "distil-cache-student/1"

__all__ = [
    "STUDENTS", "BiLSTMConfig", "BiLSTMStudent", "TextCNNConfig", "TextCNNStudent", "SmallBertConfig",
    "SmallBertStudent", "build_student", "save_student", "load_student",
]


def _cls(kind: str) -> type[nn.Module]:
    try:
        return STUDENTS[kind]
    except KeyError:
        raise UserError(f"unknown student kind {kind!r}; known: {sorted(STUDENTS)}") from None


def build_student(kind: str, cfg, vocab: Vocab | None = None, **kwargs) -> nn.Module:
    """A fresh student: word students need `vocab` (and read cfg.embeddings, or take
    embeddings=<(V, d) tensor>); small-BERT copies/derives from cfg.source."""
    return _cls(kind).from_config(cfg, vocab=vocab, **kwargs)


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
    if kind == "smallbert":
        model.tokenizer.save_pretrained(str(out))
    elif model.vocab is not None:
        model.vocab.save(out / VOCAB)
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
    cls = _cls(meta["kind"])
    if meta["kind"] == "smallbert":
        from transformers import AutoTokenizer

        model = cls.from_config(meta["config"], tokenizer=AutoTokenizer.from_pretrained(str(d)), init_weights=False)
    else:
        vocab = Vocab.load(d / VOCAB) if (d / VOCAB).is_file() else None
        model = cls.from_config(meta["config"], vocab=vocab, init_weights=False)
    load_model(model, str(d / WEIGHTS), strict=True, device=device)
    model.label_names = meta.get("label_names")
    return model.to(device).eval()
