"""Tang et al. 2019 augmentation: masking, POS-guided replacement, n-gram sampling.

Per word one X ~ U[0,1]: X < p_mask -> [MASK]; else X < p_mask + p_pos -> another word
with the same POS tag drawn from the corpus unigram distribution of that tag (the word
itself excluded, exactly, by drawing from the remaining mass). Then with probability
p_ng only a random n-gram (n ~ U{ng_min..ng_max}) is kept. Samples identical to the
original or to an earlier sample of the same row are dropped and counted.

Speed: every sentence is tokenised and tagged once (cached on disk); the tag->unigram
table is a few flat numpy arrays, and the rules of all n_iter samples of a row are
drawn in one vectorised pass from that row's own generator.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from augment.config import TangParams
from augment.parts import Samples, input_key, row_seed, stable_key, write_parquet
from augment.tagging import make_tagger, make_tokenizer, tag_rows
from data.io import UserError

TAGS_SCHEMA = pa.schema([("row_id", pa.string()), ("tokens", pa.list_(pa.string())), ("tags", pa.list_(pa.string()))])


class PosTable:
    """Corpus unigram counts of words per POS tag, as flat arrays for vectorised draws.

    Words of one tag are contiguous (sorted by word); `cum[k]` is the cumulative count up
    to and including entry k, so an integer target x in a tag's range maps to entry
    searchsorted(cum, x, 'right').
    """

    def __init__(self, tokens: list[list[str]], tags: list[list[str]]):
        counts: Counter = Counter()
        for tok, tg in zip(tokens, tags):
            counts.update((t, w) for w, t in zip(tok, tg) if t)
        keys = sorted(counts)  # (tag, word): deterministic layout
        self.words = np.array([w for _, w in keys], dtype=object)
        self.count = np.array([counts[k] for k in keys], dtype=np.int64)
        self.cum = np.cumsum(self.count)
        self.index = {k: i for i, k in enumerate(keys)}
        self.tag_ids = {}
        start, total = [], []
        for i, (tag, _) in enumerate(keys):
            if tag not in self.tag_ids:
                self.tag_ids[tag] = len(start)
                start.append(int(self.cum[i] - self.count[i]))
                total.append(0)
            total[-1] += int(self.count[i])
        self.tag_start = np.array(start, dtype=np.int64)
        self.tag_total = np.array(total, dtype=np.int64)

    def lookup(self, tokens: list[str], tags: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per token: (first cumulative slot of its tag, mass of the other words, own entry or -1)."""
        base = np.zeros(len(tokens), np.int64)
        avail = np.zeros(len(tokens), np.int64)
        own = np.full(len(tokens), -1, np.int64)
        for j, (w, t) in enumerate(zip(tokens, tags)):
            tid = self.tag_ids.get(t)
            if tid is None:
                continue
            base[j], avail[j] = self.tag_start[tid], self.tag_total[tid]
            k = self.index.get((t, w))
            if k is not None:
                own[j] = k
                avail[j] -= self.count[k]
        return base, avail, own

    def draw(self, u: np.ndarray, base: np.ndarray, avail: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Entries drawn with probability proportional to count, the own entry excluded."""
        x = base + np.minimum((u * avail).astype(np.int64), avail - 1)
        has_own = own >= 0
        own_start = np.where(has_own, self.cum[np.maximum(own, 0)] - self.count[np.maximum(own, 0)], 0)
        x = x + np.where(has_own & (x >= own_start), self.count[np.maximum(own, 0)], 0)
        return np.searchsorted(self.cum, x, side="right")


def sample_row(tokens: list[str], table: PosTable, lookup: tuple, p: TangParams,
               rng: np.random.Generator) -> tuple[list[str], Counter]:
    """n_iter candidate samples of one tokenised row (before duplicate removal).

    The random draws per row are fixed in number and order (X, U for every word, then
    the n-gram coin, length and start per sample), so tests can replay them.
    """
    n, w = p.n_iter, len(tokens)
    x = rng.random((n, w))
    u = rng.random((n, w))
    ng_coin = rng.random(n)
    ng_len = rng.integers(p.ng_min, p.ng_max + 1, size=n)
    ng_start = rng.random(n)
    base, avail, own = lookup
    masked = x < p.p_mask
    pos = (x >= p.p_mask) & (x < p.p_mask + p.p_pos)
    notes: Counter = Counter()
    no_alt = pos & (avail <= 0)[None, :]
    if no_alt.any():  # untagged word or the only word of its tag: left as it is
        notes["pos_no_alternative"] += int(no_alt.sum())
        pos &= ~no_alt
    out = np.broadcast_to(np.array(tokens, dtype=object), (n, w)).copy()
    out[masked] = p.mask_token
    if pos.any():
        r, c = np.nonzero(pos)
        out[r, c] = table.words[table.draw(u[r, c], base[c], avail[c], own[c])]
    texts = []
    for i in range(n):
        row = out[i]
        if ng_coin[i] < p.p_ng:
            k = min(int(ng_len[i]), w)
            s = int(ng_start[i] * (w - k + 1))
            row = row[s : s + k]
        texts.append(" ".join(row.tolist()))
    return texts, notes


class TangAugmenter:
    """Tang rules over a row table; tags are computed once per input and cached as Parquet."""

    name = "tang"
    parallel = True

    def __init__(self, params: TangParams, seed: int, cache_dir: str | Path, workers: int = 1):
        self.p, self.seed, self.cache_dir, self.workers = params, seed, Path(cache_dir), workers
        self.tokens: list[list[str]] = []
        self.tags: list[list[str]] = []
        self.table: PosTable | None = None

    def prepare(self, rows: pa.Table) -> dict:
        tokenize = make_tokenizer(self.p.tokenizer)
        tagger, tagger_id = make_tagger(self.p.tagger)
        texts = rows.column("text").to_pylist()
        cache = self.cache_dir / f"tang-tags-{stable_key(input_key(rows), self.p.tokenizer, tagger_id)}.parquet"
        if cache.is_file():
            import pyarrow.parquet as pq

            t = pq.read_table(cache)
            self.tokens, self.tags = t.column("tokens").to_pylist(), t.column("tags").to_pylist()
        else:
            self.tokens, self.tags = _tag_parallel(texts, self.p.tokenizer, self.p.tagger, self.workers)
            t = pa.table({"row_id": rows.column("row_id"), "tokens": self.tokens, "tags": self.tags},
                         schema=TAGS_SCHEMA)
            write_parquet(t, cache)
        self.table = PosTable(self.tokens, self.tags)
        return {"tagger": tagger_id, "tokenizer": self.p.tokenizer}

    def process(self, chunk: pa.Table, start: int) -> Samples:
        if self.table is None:
            raise UserError("tang: prepare() must run before process()")
        out = Samples()
        ids = chunk.column("row_id").to_pylist()
        for j, rid in enumerate(ids):
            tokens, tags = self.tokens[start + j], self.tags[start + j]
            if not tokens:
                out.counts["skip:empty or whitespace-only text"] += 1
                continue
            if len(tokens) == 1:
                out.counts["one_token_rows"] += 1
            untagged = sum(1 for t in tags if not t)
            if untagged:
                out.counts["untagged_words"] += untagged
            rng = np.random.default_rng(row_seed(self.seed, self.name, rid))
            texts, notes = sample_row(tokens, self.table, self.table.lookup(tokens, tags), self.p, rng)
            out.counts.update(notes)
            seen = {" ".join(tokens)}
            for i, text in enumerate(texts):
                if text in seen:
                    out.counts["duplicates"] += 1
                    continue
                seen.add(text)
                out.add(j, text, i)
        return out


def _tag_chunk(args: tuple) -> tuple[list, list]:
    texts, tokenizer, tagger = args
    return tag_rows(texts, make_tokenizer(tokenizer), make_tagger(tagger)[0])


def _tag_parallel(texts: list[str], tokenizer: str, tagger: str, workers: int) -> tuple[list, list]:
    """Tag every input sentence once, in worker processes when asked."""
    if workers <= 1 or len(texts) < 2000:
        return _tag_chunk((texts, tokenizer, tagger))
    import multiprocessing as mp

    step = -(-len(texts) // (workers * 4))
    jobs = [(texts[i : i + step], tokenizer, tagger) for i in range(0, len(texts), step)]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        done = pool.map(_tag_chunk, jobs)
    return [t for a, _ in done for t in a], [t for _, b in done for t in b]
