"""The streaming loader: exactly-once per epoch across ranks × workers, seeded shuffles, resume."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from data.io import UserError
from pipeline.cache_reader import ShardReader, TeacherCache
from trainer.loader import CacheStream, StreamConfig, to_device

SETS = ["train", "dev", "test"]


def _stream(cache_dir, rank=0, world=1, **kw):
    cfg = StreamConfig(**{"batch_size": 8, "block_rows": 16, "window_blocks": 2, "seed": 3, **kw})
    return CacheStream(cache_dir, SETS, ("logits",), cfg, rank=rank, world=world)


def _ids(stream, epoch=0, workers=0):
    stream.set_epoch(epoch)
    out = []
    for batch in DataLoader(stream, batch_size=None, num_workers=workers):
        out += batch["row_id"]
    return out


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_every_row_once_per_epoch_across_ranks_and_workers(tiny_cache, world, workers):
    _, cache_dir = tiny_cache
    want = TeacherCache(cache_dir).row_table(SETS, ["row_id"]).column("row_id").to_pylist()
    got = []
    for rank in range(world):
        got += _ids(_stream(cache_dir, rank, world), workers=workers)
    assert Counter(got) == Counter(want)


def test_shuffle_differs_by_epoch_and_repeats_by_seed(tiny_cache):
    _, cache_dir = tiny_cache
    e0, e1 = _ids(_stream(cache_dir), 0), _ids(_stream(cache_dir), 1)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert _ids(_stream(cache_dir), 1) == e1
    assert _ids(_stream(cache_dir, seed=4), 1) != e1


def test_cache_opened_once_per_process_and_left_out_of_pickles(tiny_cache):
    import pickle

    _, cache_dir = tiny_cache
    stream = _stream(cache_dir)
    first = _ids(stream, 0)
    opened = stream._cache
    assert _ids(stream, 1) and stream._cache is opened  # a later epoch keeps the open cache
    copy = pickle.loads(pickle.dumps(stream))  # what a spawned DataLoader worker receives
    assert copy._cache is None
    assert _ids(copy, 0) == first and copy._cache is not opened


def test_length_buckets_pad_less(tiny_cache):
    _, cache_dir = tiny_cache

    def padding(stream):
        total = 0
        for b in stream:
            m = b["teacher_mask"]
            total += (~m).sum().item()
        return total

    assert padding(_stream(cache_dir, bucket_by_length=True)) < padding(_stream(cache_dir, bucket_by_length=False))


def test_resume_continues_the_same_stream(tiny_cache):
    _, cache_dir = tiny_cache
    stream = _stream(cache_dir)
    stream.set_epoch(2)
    batches = [b["row_id"] for b in stream]
    resumed = _stream(cache_dir)
    resumed.set_epoch(2)
    resumed.state.batches_done = {0: 5}
    rest = [b["row_id"] for b in resumed]
    assert len(batches) > 5 and rest == batches[5:]


def test_unrequested_fields_are_not_read(tiny_cache, monkeypatch):
    _, cache_dir = tiny_cache
    opened = []
    original = ShardReader._checked

    def spy(self, name, lo, hi):
        opened.append(name)
        return original(self, name, lo, hi)

    monkeypatch.setattr(ShardReader, "_checked", spy)
    for _ in _stream(cache_dir):
        pass
    assert opened == []
    stream = CacheStream(cache_dir, ["dev"], ("logits", "attention"), StreamConfig(batch_size=8))
    batch = next(iter(stream))
    assert set(opened) == {"attention"}
    assert batch["teacher_attention"].shape[:3] == (8, 1, 12)
    # padded keys are zero outside each row's valid block
    L = batch["teacher_mask"].sum(1)
    i = int(torch.argmin(L))
    assert batch["teacher_attention"][i, :, :, L[i]:, :].abs().sum() == 0


def test_missing_field_refused_before_training(tiny_cache, tmp_path):
    run, cache_dir = tiny_cache
    from pipeline.teacher_cache import build_cache
    from tests.conftest import tiny_run_config

    logits_only = tiny_run_config(tmp_path, **{"cache.hidden_layers": "none", "cache.attention_layers": "none",
                                               "cache.store_values": False, "cache.cls_layers": "none",
                                               "data.out_dir": run.data.out_dir,
                                               "teacher.out_dir": run.teacher.out_dir})
    summary = build_cache(logits_only)
    with pytest.raises(UserError, match=r"has no \['attention'\]"):
        CacheStream(summary["cache"], ["train"], ("logits", "attention"), StreamConfig())


def _reference_batch(cache: TeacherCache, row_ids: list[str], vocab=None, pair=False) -> dict:
    """The batch those rows make, built row by row from TeacherCache.lookup and the word students' own
    vocab.encode (the per-row path the columnar stream replaced)."""
    rows = [cache.lookup(r, ("logits", "cls", "input_ids", "hidden", "attention")) for r in row_ids]
    B, L = len(rows), max(r["length"] for r in rows)
    out = {"teacher_logits": torch.stack([torch.from_numpy(r["logits"]) for r in rows]),
           "teacher_cls": torch.stack([torch.from_numpy(r["cls"].astype("float32")) for r in rows]),
           "labels": torch.tensor([-100 if r["label"] is None else r["label"] for r in rows]),
           "input_ids": torch.zeros(B, L, dtype=torch.long), "teacher_hidden": None,
           "teacher_attention": torch.zeros(B, *rows[0]["attention"].shape[:2], L, L)}
    hidden = torch.zeros(B, L, *rows[0]["hidden"].shape[1:])
    for i, r in enumerate(rows):
        n = r["length"]
        out["input_ids"][i, :n] = torch.from_numpy(r["input_ids"])
        hidden[i, :n] = torch.from_numpy(r["hidden"].astype("float32"))
        out["teacher_attention"][i, :, :, :n, :n] = torch.from_numpy(r["attention"].astype("float32"))
    out["teacher_hidden"] = hidden.transpose(1, 2)
    if vocab is not None:
        out["word_ids"], out["word_lengths"] = vocab.encode([r["text"] for r in rows], max_len=7)
        if pair:
            out["word_ids_b"], out["word_lengths_b"] = vocab.encode([r["text_b"] for r in rows], max_len=7)
    return out


@pytest.mark.parametrize("pair,window_blocks", [(False, 3), (True, 3), (False, 0)])
def test_columnar_batches_equal_the_row_by_row_ones(tiny_cache, pair, window_blocks):
    """Every field the stream slices from whole arrays (widened by to_device), and the word ids tokenised once per
    run, equal what the per-row path gives for the same rows (Tang-style `[MASK]` rows and empty second sentences included)."""
    from trainer.loader import WordIds
    from trainer.vocab import Vocab

    _, cache_dir = tiny_cache
    cache = TeacherCache(cache_dir)
    texts = cache.row_table(SETS, ["text"]).column("text").to_pylist()
    vocab = Vocab.build(texts[::2])  # half the rows: the other half has <unk> words
    words = WordIds(cache, SETS, vocab, max_len=7, pair=pair)
    fields = ("logits", "cls", "input_ids", "hidden", "attention")
    stream = CacheStream(cache_dir, SETS, fields, StreamConfig(batch_size=16, block_rows=16,
                                                               window_blocks=window_blocks, seed=5), encode=words)
    n = 0
    for epoch in (0, 1):  # a full shuffle's epoch 1 reuses the window epoch 0 read
        stream.set_epoch(epoch)
        for raw in stream:  # teacher fields leave the loader as float16; to_device widens them on the device
            assert all(raw[k].dtype == torch.float16 for k in ("teacher_cls", "teacher_hidden", "teacher_attention"))
            batch = to_device(raw, torch.device("cpu"))
            want = _reference_batch(cache, batch["row_id"], vocab, pair)
            for key, value in want.items():
                assert torch.equal(batch[key], value), key
            assert torch.equal(batch["attention_mask"], batch["teacher_mask"].long())
            assert all(v.is_contiguous() for v in batch.values() if torch.is_tensor(v))
            n += len(batch["row_id"])
    assert n == 2 * len(texts)


def test_word_ids_are_stored_once_and_mapped_by_later_runs(tiny_cache, tmp_path):
    """The first run tokenises and stores the ids; a later run, or a DataLoader worker, maps the same matrices; a
    writer that loses the race to store keeps the winner's copy; a store that does not match the cache is refused."""
    import json
    import pickle

    import numpy as np

    from trainer.loader import WordIds
    from trainer.vocab import Vocab

    _, cache_dir = tiny_cache
    cache = TeacherCache(cache_dir)
    texts = cache.row_table(SETS, ["text"]).column("text").to_pylist()
    vocab = Vocab.build(texts)
    first = WordIds(cache, SETS, vocab, max_len=7, pair=True, store=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [first.folder.name]
    later = WordIds(cache, SETS, vocab, max_len=7, pair=True, store=tmp_path)
    worker = pickle.loads(pickle.dumps(later))
    assert len(pickle.dumps(later)) < 2_000  # the folder travels, not the matrices
    in_memory = WordIds(cache, SETS, vocab, max_len=7, pair=True)
    for name, parts in in_memory.shards.items():
        for suffix, (ids, lengths) in parts.items():
            for other in (later, worker):
                assert isinstance(other.shards[name][suffix][0], np.memmap)
                np.testing.assert_array_equal(other.shards[name][suffix][0], ids)
                np.testing.assert_array_equal(other.shards[name][suffix][1], lengths)
    first._save(first.folder)  # a second writer arriving late
    assert [p.name for p in tmp_path.iterdir()] == [first.folder.name]
    WordIds(cache, SETS, Vocab.build(texts[::2]), max_len=7, pair=True, store=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # another vocabulary, another folder
    index = first.folder / "index.json"
    shards = json.loads(index.read_text())["shards"]
    index.write_text(json.dumps({"shards": {k: v + 1 for k, v in shards.items()}}))
    with pytest.raises(UserError, match="word-id store .* delete that folder"):
        WordIds(cache, SETS, vocab, max_len=7, pair=True, store=tmp_path)
