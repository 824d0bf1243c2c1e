"""Word-level tokenisation, vocabularies and pretrained word vectors (BiLSTM/TextCNN students).

Tokeniser: lower-case, then a regex close to the tokenisation GloVe 6B was trained on
(clitics split off as "n't", "'s", ...; "..." kept; every other non-space symbol, emoji
included, is its own token). "[MASK]" (any case) stays one token: Tang-augmented rows
contain it. No NLTK data needed.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from data.io import UserError, atomic_write_text

log = logging.getLogger(__name__)

PAD, UNK, MASK = "<pad>", "<unk>", "[MASK]"
SPECIALS = (PAD, UNK, MASK)  # ids 0, 1, 2
TOKENIZER_NAME = "regex-v1"
_FORMAT = "distil-cache-vocab/1"

_TOKEN_RE = re.compile(
    r"""
      \[mask\]                    # augmentation mask (text is lower-cased first)
    | [^\W_]+(?=n't\b)            # "do" / "ca" of "don't" / "can't"
    | n't\b
    | '(?:s|re|ve|ll|d|m)\b       # clitics, split as in GloVe's corpus
    | [^\W_]+(?:[-.][^\W_]+)*     # words, numbers, hyphenated words, 3.5, u.s
    | \.{2,}                      # ellipsis
    | \S                          # any other symbol: punctuation, emoji, ...
    """,
    re.X,
)


def tokenize(text: str | None) -> list[str]:
    """Lower-cased word tokens of `text` ("[MASK]" kept whole); None -> []."""
    if not text:
        return []
    return [MASK if t == "[mask]" else t for t in _TOKEN_RE.findall(text.lower())]


class Vocab:
    """Token <-> id table: <pad>=0, <unk>=1, [MASK]=2, then words by falling frequency."""

    def __init__(self, itos: Sequence[str]):
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocab has duplicate tokens")

    pad_id, unk_id, mask_id = 0, 1, 2

    @classmethod
    def build(cls, texts: Iterable[str | None], min_freq: int = 1, max_size: int | None = None) -> "Vocab":
        """Count tokens of `texts`; keep those seen >= min_freq, at most max_size words (+ specials)."""
        counts = Counter(t for text in texts for t in tokenize(text))
        for s in SPECIALS:
            counts.pop(s, None)
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def lookup(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def encode(self, texts: Sequence[str | None], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) long padded with 0, lengths (B,) long); an empty text is one <unk>."""
        rows = []
        for text in texts:
            ids = self.lookup(tokenize(text))[:max_len] if max_len else self.lookup(tokenize(text))
            rows.append(ids or [self.unk_id])
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        out = torch.zeros(len(rows), int(lengths.max()) if rows else 1, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out, lengths

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "tokenizer": TOKENIZER_NAME, "lowercase": True, "itos": self.itos}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"vocabulary file not found: {path}") from None
        if data.get("format") != _FORMAT or data.get("tokenizer") != TOKENIZER_NAME:
            raise UserError(f"{path}: not a {_FORMAT} vocabulary with the {TOKENIZER_NAME} tokenizer")
        return cls(data["itos"])


# ---------------------------------------------------------------- pretrained vectors


def _glove50_lookup(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(row index per word or -1, matrix) from the shipped GloVe 6B 50d (npy + parquet)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from data.assets import glove_paths

    emb_path, index_path = glove_paths()
    index = pq.read_table(index_path, columns=["index"]).column("index")
    rows = pc.index_in(pa.array(words, type=pa.string()), value_set=index).fill_null(-1)
    return rows.to_numpy(zero_copy_only=False).astype(np.int64), np.load(emb_path, mmap_mode="r")


def _gensim_lookup(path: Path, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Same, from a word2vec text/binary file or a GloVe text file (no header), via gensim."""
    from gensim.models import KeyedVectors

    binary = path.suffix == ".bin"
    no_header = False
    if not binary:
        with open(path, encoding="utf-8", errors="ignore") as f:
            first = f.readline().split()
        no_header = not (len(first) == 2 and all(p.isdigit() for p in first))
    try:
        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header, unicode_errors="ignore")
    except Exception as e:  # gensim raises assorted errors on bad files
        raise UserError(f"cannot read word vectors from {path}: {type(e).__name__}: {e}") from None
    k2i = kv.key_to_index
    rows = []
    for w in words:  # the vocab is lower-case; cased files (word2vec) may only hold "Paris"
        i = next((k2i[c] for c in (w, w.capitalize(), w.upper()) if c in k2i), -1)
        rows.append(i)
    return np.asarray(rows, dtype=np.int64), kv.vectors


def load_embeddings(vocab: Vocab, source: str | os.PathLike = "glove50", seed: int = 0) -> tuple[torch.Tensor, int]:
    """(V, d) float32 initial embeddings for `vocab` and the number of words not found.

    source: "glove50" (the shipped GloVe 6B 50d) or a word2vec/GloVe text or .bin file.
    <pad> is zero; <unk>, [MASK] and missing words get seeded N(0, σ²) rows, σ the std of
    the pretrained matrix (Kim 2014 matches the variance likewise).
    """
    words = vocab.itos
    if str(source) == "glove50":
        rows, matrix = _glove50_lookup(words)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"word-vector file not found: {path}")
        rows, matrix = _gensim_lookup(path, words)
    found = rows >= 0
    found[: len(SPECIALS)] = False
    sample = np.asarray(matrix[: min(len(matrix), 20000)], dtype=np.float32)
    sigma = float(sample.std()) if sample.size else 0.1
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(len(words), matrix.shape[1], generator=gen) * sigma
    if found.any():
        out[torch.from_numpy(found)] = torch.from_numpy(np.asarray(matrix[rows[found]], dtype=np.float32))
    out[Vocab.pad_id] = 0.0
    missing = int(len(words) - len(SPECIALS) - found.sum())
    log.info("embeddings %s: %d/%d vocabulary words found, %d missing (random init)",
             source, int(found.sum()), len(words) - len(SPECIALS), missing)
    return out, missing
