"""Tang et al. 2019 augmentation: masking, POS-guided replacement, n-gram sampling.

Per word one X ~ U[0,1]: X < p_mask -> [MASK]; else X < p_mask + p_pos -> another word
with the same POS tag drawn from the corpus unigram distribution of that tag (the word
itself excluded, exactly, by drawing from the remaining mass). Then with probability
p_ng only a random n-gram (n ~ U{ng_min..ng_max}) is kept. Samples identical to the
original or to an earlier sample of the same row are dropped and counted.

Speed: every sentence is tokenised and tagged once (cached on disk); the tag->unigram
table is a few flat numpy arrays; all draws of a whole chunk are one vectorised pass
over counter-based per-row random streams (so they still belong to each row alone).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
        tid = np.array([self.tag_ids.get(t, -1) for t in tags], dtype=np.int64)
        own = np.array([self.index.get((t, w), -1) for w, t in zip(tokens, tags)], dtype=np.int64)
        known = tid >= 0
        base = np.where(known, self.tag_start[np.maximum(tid, 0)], 0) if len(self.tag_start) else tid * 0
        total = np.where(known, self.tag_total[np.maximum(tid, 0)], 0) if len(self.tag_total) else tid * 0
        avail = total - np.where(own >= 0, self.count[np.maximum(own, 0)] if len(self.count) else 0, 0)
        return base, avail, own

    def draw(self, u: np.ndarray, base: np.ndarray, avail: np.ndarray, own: np.ndarray) -> np.ndarray:
        """Entries drawn with probability proportional to count, the own entry excluded."""
        x = base + np.minimum((u * avail).astype(np.int64), avail - 1)
        has_own = own >= 0
        own_start = np.where(has_own, self.cum[np.maximum(own, 0)] - self.count[np.maximum(own, 0)], 0)
        x = x + np.where(has_own & (x >= own_start), self.count[np.maximum(own, 0)], 0)
        return np.searchsorted(self.cum, x, side="right")


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """U[0,1) number `counter` of the SplitMix64 stream `seed`, for whole arrays at once.

    Counter-based: any draw of any row is computed directly, so a chunk's draws are one
    vectorised pass and still belong to each row alone (workers and chunking cannot
    change them).
    """
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) + (counters.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_chunk(tokens: list[list[str]], table: PosTable, lookup: tuple, seeds: np.ndarray,
                 p: TangParams) -> tuple[list[list[str]], Counter]:
    """n_iter candidate samples for each (non-empty) tokenised row, before duplicate removal.

    Draw layout per row (W words, n = n_iter): counter 2(iW+j) is X and 2(iW+j)+1 is U for
    word j of sample i; counters 2nW+3i .. +2 are sample i's n-gram coin, length, start.
    `lookup` is PosTable.lookup of all tokens, flattened in row order.
    """
    n = p.n_iter
    lens = np.array([len(t) for t in tokens], dtype=np.int64)
    rows = len(tokens)
    tok_off = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    per_row = n * lens
    e_off = np.concatenate([[0], np.cumsum(per_row)[:-1]]).astype(np.int64)
    row = np.repeat(np.arange(rows), per_row)
    e = np.arange(int(per_row.sum()), dtype=np.int64) - e_off[row]
    tok = tok_off[row] + e % lens[row]
    seed_e = seeds[row]
    x = uniforms(seed_e, 2 * e)
    base, avail, own = lookup
    masked = x < p.p_mask
    pos = (x >= p.p_mask) & (x < p.p_mask + p.p_pos)
    notes: Counter = Counter()
    no_alt = pos & (avail[tok] <= 0)
    if no_alt.any():  # untagged word or the only word of its tag: left as it is
        notes["pos_no_alternative"] += int(no_alt.sum())
        pos &= ~no_alt
    flat = np.empty(int(lens.sum()), dtype=object)
    flat[:] = [w for t in tokens for w in t]
    out = flat[tok]
    out[masked] = p.mask_token
    if pos.any():
        t = tok[pos]
        u = uniforms(seed_e[pos], 2 * e[pos] + 1)
        out[pos] = table.words[table.draw(u, base[t], avail[t], own[t])]
    srow = np.repeat(np.arange(rows), n)
    i = np.arange(rows * n, dtype=np.int64) - n * srow
    w = lens[srow]
    c0 = 2 * n * w + 3 * i
    coin = uniforms(seeds[srow], c0) < p.p_ng
    k = np.minimum(p.ng_min + (uniforms(seeds[srow], c0 + 1) * (p.ng_max - p.ng_min + 1)).astype(np.int64), w)
    st = (uniforms(seeds[srow], c0 + 2) * (w - k + 1)).astype(np.int64)
    start = e_off[srow] + i * w + np.where(coin, st, 0)
    end = start + np.where(coin, k, w)
    words = out.tolist()
    texts = [" ".join(words[a:b]) for a, b in zip(start.tolist(), end.tolist())]
    return [texts[r * n : (r + 1) * n] for r in range(rows)], notes


def sample_row(tokens: list[str], tags: list[str], table: PosTable, p: TangParams, seed: int) -> list[str]:
    """The n_iter samples of one row (tests and examples)."""
    got, _ = sample_chunk([tokens], table, table.lookup(tokens, tags), np.array([seed], dtype=np.uint64), p)
    return got[0]


class TangAugmenter:
    """Tang rules over a row table; tags are computed once per input and cached as Parquet."""

    name = "tang"
    parallel = True
    start_method = "fork"  # workers share the tag table copy-on-write

    def __init__(self, params: TangParams, seed: int, cache_dir: str | Path, workers: int = 1):
        self.p, self.seed, self.cache_dir, self.workers = params, seed, Path(cache_dir), workers
        self.tokens: list[list[str]] = []
        self.tags: list[list[str]] = []
        self.table: PosTable | None = None

    def prepare(self, rows: pa.Table) -> dict:
        make_tokenizer(self.p.tokenizer)  # fail early on a bad name
        tagger_id = make_tagger(self.p.tagger)[1]
        texts = rows.column("text").to_pylist()
        cache = self.cache_dir / f"tang-tags-{stable_key(input_key(rows), self.p.tokenizer, tagger_id)}.parquet"
        t = pq.read_table(cache) if cache.is_file() else None
        if t is not None and t.column("row_id").to_pylist() == rows.column("row_id").to_pylist():
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
        live = [j for j in range(len(ids)) if self.tokens[start + j]]
        out.counts["skip:empty or whitespace-only text"] += len(ids) - len(live)
        tokens = [self.tokens[start + j] for j in live]
        tags = [self.tags[start + j] for j in live]
        out.counts["one_token_rows"] += sum(1 for t in tokens if len(t) == 1)
        out.counts["untagged_words"] += sum(1 for tg in tags for t in tg if not t)
        if not live:
            return out
        flat_tokens = [w for t in tokens for w in t]
        lookup = self.table.lookup(flat_tokens, [t for tg in tags for t in tg])
        seeds = np.array([row_seed(self.seed, self.name, ids[j]) for j in live], dtype=np.uint64)
        samples, notes = sample_chunk(tokens, self.table, lookup, seeds, self.p)
        out.counts.update(notes)
        dups = 0
        for j, toks, texts in zip(live, tokens, samples):
            seen = {" ".join(toks)}
            keep = [i for i, text in enumerate(texts) if not (text in seen or seen.add(text))]  # first sight only
            dups += len(texts) - len(keep)
            out.src.extend([j] * len(keep))
            out.text.extend([texts[i] for i in keep])
            out.sample.extend(keep)
        out.counts["duplicates"] += dups
        out.counts = +out.counts  # drop zero entries
        return out


def _tag_chunk(args: tuple) -> tuple[list, list]:
    texts, tokenizer, tagger = args
    return tag_rows(texts, make_tokenizer(tokenizer), make_tagger(tagger)[0])


def _tag_parallel(texts: list[str], tokenizer: str, tagger: str, workers: int) -> tuple[list, list]:
    """Tag every input sentence once, in worker processes when asked."""
    if workers <= 1 or len(texts) < 2000:
        return _tag_chunk((texts, tokenizer, tagger))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    step = -(-len(texts) // (workers * 4))
    jobs = [(texts[i : i + step], tokenizer, tagger) for i in range(0, len(texts), step)]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as ex:  # a dead worker raises, never hangs
        done = list(ex.map(_tag_chunk, jobs))
    return [t for a, _ in done for t in a], [t for _, b in done for t in b]
