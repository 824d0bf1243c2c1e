"""Tang et al. rules on fixed seeds: real tokeniser, real tagger, real tables (no mocks)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from augment.config import AugmentConfig, TangParams
from augment.tang import PosTable, TangAugmenter, sample_row, uniforms
from augment.tagging import make_tagger, make_tokenizer, tag_rows
from data.config import ConfigError
from data.rows import ROW_SCHEMA

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a happy dog runs in the green park",
    "my old car drives slowly on the long road",
    "the small cat sleeps under a warm blanket",
    "a fast train leaves the busy station today",
    "the tired driver parks his new car near the house",
]


@pytest.fixture(scope="module")
def tagged():
    tokens, tags = tag_rows(CORPUS, make_tokenizer("tweet"), make_tagger("auto")[0])
    return tokens, tags, PosTable(tokens, tags)


def draws(seed: int, n: int, w: int) -> np.ndarray:
    """Replay X of the documented draw layout: counter 2(iW+j) for word j of sample i."""
    e = np.arange(n * w, dtype=np.uint64)
    return uniforms(np.full(n * w, seed, dtype=np.uint64), 2 * e).reshape(n, w)


def test_rules_are_exclusive_per_word_and_pos_keeps_the_tag(tagged):
    tokens, tags, table = tagged
    p = TangParams(p_mask=0.3, p_pos=0.3, p_ng=0.0, n_iter=200)
    tok, tg = tokens[2], tags[2]
    texts = sample_row(tok, tg, table, p, seed=5)
    x = draws(5, p.n_iter, len(tok))
    n_mask = n_pos = 0
    for i, text in enumerate(texts):
        out = text.split(" ")
        assert len(out) == len(tok)
        for j, (orig, new) in enumerate(zip(tok, out)):
            if x[i, j] < p.p_mask:
                assert new == "[MASK]"
                n_mask += 1
            elif x[i, j] < p.p_mask + p.p_pos:
                assert new != "[MASK]"
                if table.lookup([orig], [tg[j]])[1][0] > 0:  # the tag has another word
                    assert new != orig, "POS replacement must pick another word"
                    assert (tg[j], new) in table.index, f"{new!r} is not a {tg[j]} word of the corpus"
                n_pos += 1
            else:
                assert new == orig
    assert n_mask > 0 and n_pos > 0


def test_ngram_length_bounds_and_contiguity(tagged):
    tokens, tags, table = tagged
    p = TangParams(p_mask=0.0, p_pos=0.0, p_ng=1.0, n_iter=300)
    tok, tg = tokens[5], tags[5]
    texts = sample_row(tok, tg, table, p, seed=1)
    lengths = Counter()
    joined = " " + " ".join(tok) + " "
    for t in texts:
        n = len(t.split(" "))
        assert 1 <= n <= 5
        assert f" {t} " in joined  # a contiguous n-gram of the sentence
        lengths[n] += 1
    assert set(lengths) == {1, 2, 3, 4, 5}
    short = ["just", "two"]
    texts = sample_row(short, ["RB", "CD"], table, p, seed=2)
    assert all(1 <= len(t.split(" ")) <= 2 for t in texts)


def test_replacement_frequencies_within_statistical_bounds(tagged):
    tokens, tags, table = tagged
    p = TangParams(n_iter=4000, p_ng=0.0)  # paper defaults p_mask = p_pos = 0.1
    tok, tg = tokens[0], tags[0]
    texts = sample_row(tok, tg, table, p, seed=11)
    masked = sum(t.split(" ").count("[MASK]") for t in texts)
    draws_total = p.n_iter * len(tok)
    sigma = (0.1 * 0.9 / draws_total) ** 0.5
    assert abs(masked / draws_total - 0.1) < 5 * sigma
    # The replacement for "the" (DT) follows the DT unigram counts without "the" itself.
    j = tok.index("the")
    dt = {w: c for (t, w), c in ((k, table.count[i]) for k, i in table.index.items()) if t == tg[j] and w != "the"}
    got = Counter(t.split(" ")[j] for t in texts)
    got = {w: got[w] for w in dt}
    n = sum(got.values())
    assert n > 0.1 * p.n_iter * 0.7
    total = sum(dt.values())
    for w, c in dt.items():
        q = c / total
        assert abs(got[w] / n - q) < 5 * (q * (1 - q) / n) ** 0.5 + 1e-9


def test_uniforms_are_uniform_and_row_local():
    u = uniforms(np.full(200_000, 12345, dtype=np.uint64), np.arange(200_000, dtype=np.uint64))
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 20_000) < 5 * 20_000**0.5)
    other = uniforms(np.full(1000, 12346, dtype=np.uint64), np.arange(1000, dtype=np.uint64))
    assert abs(np.corrcoef(u[:1000], other)[0, 1]) < 0.15


def test_pos_table_draws_the_unigram_distribution_exactly():
    table = PosTable([["a", "b", "b", "c", "c", "c"]], [["X"] * 6])
    base, avail, own = table.lookup(["a"], ["X"])
    assert avail[0] == 5  # the mass of b and c
    u = (np.arange(10000) + 0.5) / 10000
    words = table.words[table.draw(u, base.repeat(len(u)), avail.repeat(len(u)), own.repeat(len(u)))]
    c = Counter(words.tolist())
    assert c["a"] == 0 and c["b"] == 4000 and c["c"] == 6000


def test_augmenter_drops_duplicates_and_counts_bad_rows(tmp_path):
    texts = ["", "   ", "hello", "😀 🚗 ✨", "Café crème brûlée is très bon", "the dog runs in the park"]
    rows = pa.Table.from_pydict({
        "row_id": [f"r{i}" for i in range(len(texts))], "text": texts, "text_b": [None] * len(texts),
        "label": [1] * len(texts), "split": ["train"] * len(texts), "source_id": [None] * len(texts),
        "method": ["original"] * len(texts), "provenance": [None] * len(texts)}, schema=ROW_SCHEMA)
    aug = TangAugmenter(TangParams(n_iter=30), seed=3, cache_dir=tmp_path)
    ident = aug.prepare(rows)
    assert ident["tagger"].startswith(("textblob", "nltk"))
    s = aug.process(rows, 0)
    assert s.counts["skip:empty or whitespace-only text"] == 2
    assert s.counts["one_token_rows"] == 1
    assert s.counts["duplicates"] > 0
    assert {texts[i] for i in s.src} >= {"hello", "😀 🚗 ✨", "the dog runs in the park"}
    for src in set(s.src):
        mine = [t for i, t in zip(s.src, s.text) if i == src]
        assert len(mine) == len(set(mine)), "duplicates of one row must be dropped"
        assert " ".join(aug.tokens[src]) not in mine, "a sample equal to the original must be dropped"
    assert len(s.text) + s.counts["duplicates"] == 30 * 4
    assert list(tmp_path.glob("tang-tags-*.parquet")), "tags are cached on disk"


def test_config_validation():
    with pytest.raises(ConfigError):
        AugmentConfig(methods=["eda"])
    with pytest.raises(ConfigError):
        AugmentConfig(tang=TangParams(p_mask=0.7, p_pos=0.5))
    with pytest.raises(ConfigError):
        AugmentConfig(tang=TangParams(ng_min=0))
