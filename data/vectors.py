"""Pretrained word vectors, one reader for both stages: TinyBERT's GloVe neighbours (augment.glove) and the
word students' embeddings (trainer.vocab)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.io import UserError

SHIPPED = ("glove50", "shipped")  # the GloVe 6B 50d of `make assets` (the students' name, augmentation's name)


@dataclass
class WordVectors:
    """The fields of gensim's KeyedVectors that callers read; the shipped vectors skip gensim's build."""

    index_to_key: list[str]
    key_to_index: dict[str, int]
    vectors: np.ndarray  # (words, d) float32


def vector_file(source: str | Path, setting: str) -> Path:
    """A user's vector file, refused in one line naming `setting` when it is not there."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{setting}: {path} not found (give a GloVe/word2vec text or .bin file, "
                        f"or {SHIPPED[0]} for the shipped GloVe 6B 50d)")
    return path


def load_vectors(source: str | Path, setting: str, limit: int = 0) -> WordVectors:
    """The shipped GloVe 6B 50d or a GloVe/word2vec text or .bin file (gensim); `limit` keeps the first
    words only (0: all)."""
    if str(source) in SHIPPED:
        import pyarrow.parquet as pq

        from data.assets import glove_paths

        emb_path, index_path = glove_paths()
        words = [str(w) for w in pq.read_table(index_path, columns=["index"]).column("index").to_pylist()]
        n = min(limit or len(words), len(words))
        emb = np.asarray(np.load(emb_path, mmap_mode="r")[:n], dtype=np.float32)
        return WordVectors(words[:n], {w: i for i, w in enumerate(words[:n])}, emb)
    from gensim.models import KeyedVectors

    path = vector_file(source, setting)
    binary, no_header = path.suffix == ".bin", False
    if not binary:  # word2vec text opens with "<words> <dims>", GloVe text with a vector
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline().split()
        no_header = not (len(first) == 2 and all(x.isdigit() for x in first))
    try:
        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header, limit=limit or None,
                                               unicode_errors="replace")
    except Exception as e:  # gensim raises assorted errors on bad files
        raise UserError(f"{setting}: {path} is not a GloVe/word2vec file ({type(e).__name__}: {e})") from None
    return WordVectors(kv.index_to_key, kv.key_to_index, kv.vectors)
