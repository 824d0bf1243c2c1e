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
from data.vectors import WordVectors, load_vectors

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
    def build(cls, texts: Iterable[str | None], min_freq: int = 1, max_size: int | None = None,
              pretrained: dict | None = None, oov_min_freq: int = 1,
              original: Iterable[str | None] | None = None) -> "Vocab":
        """Count tokens of `texts`; keep those seen >= min_freq, at most max_size words (+ specials).
        With `pretrained` (word -> row of the vectors), a word without a vector also needs oov_min_freq
        occurrences in `original` (default: `texts`; give the rows before augmentation, whose copies would
        repeat every word): rarer ones (URL tails, typos) read <unk>, which training then learns."""
        counts = Counter(t for text in texts for t in tokenize(text))
        for s in SPECIALS:
            counts.pop(s, None)
        seen = counts if original is None else Counter(t for text in original for t in tokenize(text))

        def keep(w: str, c: int) -> bool:
            return c >= min_freq and (pretrained is None or seen[w] >= oov_min_freq or vector_row(pretrained, w) >= 0)

        words = sorted((w for w, c in counts.items() if keep(w, c)), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def lookup(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def ids(self, text: str | None, max_len: int | None = None) -> list[int]:
        """A text's word ids, cut at max_len words; an empty text is one <unk>."""
        ids = self.lookup(tokenize(text))
        return (ids[:max_len] if max_len else ids) or [self.unk_id]

    def encode(self, texts: Sequence[str | None], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) long padded with 0, lengths (B,) long); an empty text is one <unk>."""
        rows = [self.ids(text, max_len) for text in texts]
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


def vector_row(key_to_index: dict, word: str) -> int:
    """Row of a lower-case vocabulary word in a vector file (cased files such as word2vec may only hold
    "Paris"), -1 if absent."""
    return next((key_to_index[c] for c in (word, word.capitalize(), word.upper()) if c in key_to_index), -1)


def load_embeddings(vocab: Vocab, source: str | os.PathLike | WordVectors = "glove50", seed: int = 0,
                    oov_std: float = 0.0) -> tuple[torch.Tensor, int]:
    """(V, d) float32 initial embeddings for `vocab` and the number of words not found.

    source: "glove50" (the shipped GloVe 6B 50d), a word2vec/GloVe text or .bin file, or vectors already
    loaded. <pad> is zero; <unk>, [MASK] and missing words get seeded N(0, oov_std²) rows; oov_std 0 takes
    the std of the pretrained matrix (Kim 2014's variance matching).
    """
    words = vocab.itos
    kv = source if isinstance(source, WordVectors) else load_vectors(source, "embeddings")
    matrix = kv.vectors
    rows = np.array([vector_row(kv.key_to_index, w) for w in words], dtype=np.int64)
    found = rows >= 0
    found[: len(SPECIALS)] = False
    sample = np.asarray(matrix[: min(len(matrix), 20000)], dtype=np.float32)
    sigma = oov_std or (float(sample.std()) if sample.size else 0.1)
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(len(words), matrix.shape[1], generator=gen) * sigma
    if found.any():
        out[torch.from_numpy(found)] = torch.from_numpy(np.asarray(matrix[rows[found]], dtype=np.float32))
    out[Vocab.pad_id] = 0.0
    missing = int(len(words) - len(SPECIALS) - found.sum())
    log.info("embeddings: %d/%d vocabulary words found, %d missing (random init, std %.2f)",
             int(found.sum()), len(words) - len(SPECIALS), missing, sigma)
    return out, missing
