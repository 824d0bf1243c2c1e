"""GloVe nearest neighbours for multi-piece words (TinyBERT substitution).

The reference searches the whole (first 100k words of the) GloVe matrix once per word
occurrence. Here the neighbours of every distinct word a corpus needs are computed in
blocked matrix products once and kept on disk as Parquet (word -> K neighbours); later
runs load the table and only compute words it lacks.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from augment.parts import stable_key, write_parquet
from data.vectors import SHIPPED, load_vectors, vector_file

NN_SCHEMA = pa.schema([("word", pa.string()), ("neighbours", pa.list_(pa.string()))])


def vectors_identity(spec: str, limit: int) -> str:
    """Names the vectors without loading them, so a warm neighbour table needs no GloVe load."""
    if spec in SHIPPED:
        return f"glove-6B-50d:{limit or 'all'}"
    path = vector_file(spec, "tinybert.glove")
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:12]
    return f"{path.name}:{path.stat().st_size}:{head}:{limit or 'all'}"


def neighbour_matrix(kv, queries: list[str], k: int, block: int = 1024) -> list[list[str]]:
    """K nearest words by cosine for each query in the vectors (self excluded), best first."""
    norms = np.linalg.norm(kv.vectors, axis=1)
    normed = kv.vectors / np.where(norms > 0, norms, 1.0)[:, None]
    ids = np.array([kv.key_to_index[w] for w in queries], dtype=np.int64)
    out: list[list[str]] = []
    keys = kv.index_to_key
    kk = min(k + 1, len(keys))
    for s in range(0, len(ids), block):
        q = ids[s : s + block]
        sim = normed[q] @ normed.T
        sim[np.arange(len(q)), q] = -np.inf
        top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)[:, :k]
        out.extend([keys[j] for j in row] for row in top)
    return out


class NeighbourTable:
    """word -> K GloVe neighbours, persisted per (vectors, K) and grown on demand."""

    def __init__(self, spec: str, limit: int, k: int, cache_dir: str | Path):
        self.spec, self.limit, self.k, self.cache_dir = spec, limit, k, Path(cache_dir)
        self._kv = None
        self.identity = vectors_identity(spec, limit)
        self.table: dict[str, list[str]] = {}

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _kv=None)  # workers use the table; vectors reload if ever needed

    def _vectors(self):
        if self._kv is None:
            self._kv = load_vectors(self.spec, "tinybert.glove", self.limit)
        return self._kv

    def path(self) -> Path:
        return self.cache_dir / f"glove-nn-{stable_key(self.identity, self.k)}.parquet"

    def ensure(self, words: set[str]) -> dict:
        """Make sure every word has an entry ([] when the vectors lack it); returns counts."""
        path = self.path()
        if not self.table and path.is_file():
            t = pq.read_table(path)
            self.table = dict(zip(t.column("word").to_pylist(), t.column("neighbours").to_pylist()))
        missing = sorted(w for w in words if w not in self.table)
        kv = self._vectors() if missing else None
        known = [w for w in missing if w in kv.key_to_index] if missing else []
        for w, nn in zip(known, neighbour_matrix(kv, known, self.k) if known else []):
            self.table[w] = nn
        for w in missing:
            self.table.setdefault(w, [])
        if missing:
            words_sorted = sorted(self.table)
            write_parquet(pa.table({"word": words_sorted, "neighbours": [self.table[w] for w in words_sorted]},
                                   schema=NN_SCHEMA), path)
        return {"computed": len(known), "not_in_vectors": len(missing) - len(known), "cached": len(words) - len(missing)}

    def get(self, word: str) -> list[str]:
        return self.table.get(word, [])
