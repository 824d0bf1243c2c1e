"""Stream training batches from a teacher cache.

The plan of an epoch is a pure function of (seed, epoch, rank, worker): shard blocks
(`block_rows` rows, read whole so Zarr is read by slices, never row by row) are
shuffled and dealt round-robin to the world × workers consumers, so no row is seen
twice per epoch. Each consumer reads `window_blocks` blocks at a time (0: its whole
plan, a full shuffle), permutes their rows and cuts them into batches, optionally
bucketed by length. Shards are written in length order, so a small window holds a few
length clusters and bucketing makes batches length-homogeneous: both cost accuracy
(docs/methods.md, "Student defaults"), which is why training defaults to a full shuffle. Because a window's
permutation depends only on its index, a run resumed from (epoch, batches done) skips whole windows and
continues on the very same stream. A full shuffle reads its one window (every block of the plan) once per
stream, in block order, and reuses it each epoch through a row map.

A window is held as arrays (`Window`: the blocks' `Columns` joined, ragged fields as flat positions + row
starts) and every batch is sliced and padded from them with index arithmetic, never through per-row Python
objects. Teacher fields leave the loader as float16 and are widened to float32 by `to_device` on the device
the student trains on (on a GPU: half the bytes copied, the cast done there). The built-in word students' ids
are tokenised once per cache and vocabulary (`WordIds`, stored beside the runs), not per batch and epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.io import UserError, atomic_write_text, fsync_dir
from pipeline.cache_reader import Columns, TeacherCache


@dataclass
class StreamConfig:
    batch_size: int = 64
    block_rows: int = 512
    window_blocks: int = 0  # shuffle buffer = block_rows * window_blocks rows; 0 = the whole plan
    bucket_by_length: bool = False  # batches of similar length (less padding, lower accuracy)
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False


@dataclass
class StreamState:
    """Where a consumer stands: epoch and batches already yielded in it (saved in checkpoints)."""

    epoch: int = 0
    batches_done: dict[int, int] = field(default_factory=dict)  # consumer id -> batches done this epoch


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]))


class CacheStream(IterableDataset):
    """Yields ready batches (dicts of tensors and lists); use DataLoader(batch_size=None)."""

    def __init__(self, cache_dir, sets, fields, cfg: StreamConfig, encode=None, rank: int = 0, world: int = 1,
                 second_cache=None):
        self.cache_dir, self.sets, self.fields, self.cfg = cache_dir, list(sets), tuple(fields), cfg
        self.encode, self.rank, self.world = encode, rank, world
        self.second_dir = second_cache
        self.state = StreamState()
        self._kept: tuple[tuple, Window] | None = None  # a full shuffle's window, read once (blocks, rows)
        cache = TeacherCache(cache_dir)
        cache.check_fields(self.fields)
        self.layout = {"cls_layers": cache.layout.cls_layers, "hidden_layers": cache.layout.hidden_layers,
                       "attention_layers": cache.layout.attention_layers,
                       "num_layers": cache.manifest.teacher.num_layers,
                       "hidden_size": cache.manifest.teacher.hidden_size,
                       "num_heads": cache.manifest.teacher.num_heads}
        self.blocks = [(s.name, start, min(start + cfg.block_rows, s.rows))
                       for s in cache.shards(self.sets) for start in range(0, s.rows, cfg.block_rows)]
        self.num_rows = sum(b[2] - b[1] for b in self.blocks)
        second = TeacherCache(second_cache) if second_cache is not None else None
        if second is not None:
            second.check_fields(("logits",))
            if second.label_names != cache.label_names:
                raise ValueError(f"second teacher cache {second_cache} has labels {second.label_names}, "
                                 f"first has {cache.label_names}")
        self._cache, self._second = cache, second  # the caches just checked serve this process's epochs
        self._opened_in: int | None = os.getpid()  # the process that opened them

    def _open(self) -> None:
        """The caches, opened once per process (not per epoch: that was a tenth of a small epoch's time); a
        DataLoader worker opens its own rather than use its parent's."""
        if self._opened_in != os.getpid():
            self._cache = TeacherCache(self.cache_dir)
            self._second = TeacherCache(self.second_dir) if self.second_dir is not None else None
            self._opened_in = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None, "_second": None, "_opened_in": None}

    def set_epoch(self, epoch: int) -> None:
        self.state = StreamState(epoch=epoch)

    def consumer_plan(self, epoch: int, consumer: int, consumers: int) -> list[tuple[str, int, int]]:
        order = _rng(self.cfg.seed, epoch).permutation(len(self.blocks)) if self.cfg.shuffle else range(len(self.blocks))
        return [self.blocks[i] for i in order][consumer::consumers]

    def windows(self, plan: list) -> list[list]:
        w = self.cfg.window_blocks or max(1, len(plan))
        return [plan[i : i + w] for i in range(0, len(plan), w)]

    def _window_batches(self, epoch: int, consumer: int, index: int, window: list) -> list[np.ndarray]:
        """Row order of one window, cut into batches (indices into the window's rows)."""
        n = sum(stop - start for _, start, stop in window)
        rng = _rng(self.cfg.seed, epoch, consumer, index)
        perm = rng.permutation(n) if self.cfg.shuffle else np.arange(n)
        bs = self.cfg.batch_size
        if self.cfg.bucket_by_length and self.cfg.shuffle:
            lengths = np.concatenate([self._lengths(name, start, stop) for name, start, stop in window])
            perm = perm[np.argsort(lengths[perm], kind="stable")]
            batches = [perm[i : i + bs] for i in range(0, n, bs)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            batches = [perm[i : i + bs] for i in range(0, n, bs)]
        if self.cfg.drop_last:
            batches = [b for b in batches if len(b) == bs]
        return batches

    def _lengths(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._cache.reader(name).table.column("length").slice(start, stop - start).to_numpy()

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        consumers, consumer = self.world * workers, self.rank * workers + worker
        self._open()
        epoch = self.state.epoch
        skip = self.state.batches_done.get(consumer, 0)
        plan = self.consumer_plan(epoch, consumer, consumers)
        tokenise = self.encode is not None and not isinstance(self.encode, WordIds)
        done = 0
        for index, window in enumerate(self.windows(plan)):
            batches = self._window_batches(epoch, consumer, index, window)
            if done + len(batches) <= skip:  # resumed: this whole window was consumed before
                done += len(batches)
                continue
            rows, remap = self._window(window)
            for b in batches:
                if done < skip:
                    done += 1
                    continue
                done += 1
                batch = rows.batch(b if remap is None else remap[b], self.layout)
                if tokenise:
                    batch.update(self.encode(batch["text"], batch["text_b"]))
                batch["stream"] = {"consumer": consumer, "batches_done": done}
                yield batch

    def _window(self, window: list) -> tuple["Window", np.ndarray | None]:
        """The window's rows, and where its rows (in window order) sit in them. A full shuffle's one window holds
        the same blocks every epoch: it is read once, in block order, and kept for the next epochs."""
        if self.cfg.window_blocks:
            return self._read_window(window), None
        blocks = tuple(sorted(window))
        if self._kept is None or self._kept[0] != blocks:
            self._kept = (blocks, self._read_window(list(blocks)))
        first, at = {}, 0
        for b in blocks:
            first[b], at = at, at + b[2] - b[1]
        return self._kept[1], np.concatenate([np.arange(first[b], first[b] + b[2] - b[1]) for b in window])

    def _read_window(self, window: list) -> "Window":
        """The window's blocks as one set of arrays (+ the text columns the batches carry)."""
        parts = [self._cache.reader(name).columns(start, stop, self.fields) for name, start, stop in window]
        texts = ("row_id", "text", "text_b") if self.encode is not None and not isinstance(self.encode, WordIds) \
            else ("row_id",)
        strings = {k: np.concatenate([self._cache.reader(name).table.column(k).slice(start, stop - start)
                                      .to_numpy(zero_copy_only=False) for name, start, stop in window])
                   for k in texts}
        words = [self.encode.block(name, start, stop) for name, start, stop in window] \
            if isinstance(self.encode, WordIds) else []
        rows = Window.concat(parts, strings, words)
        if self._second is not None:  # Dynamic KD's weak teacher: its logits, joined by row id
            rows.cols.rows["teacher2_logits"] = self._second.logits_of(strings["row_id"])
        return rows


class WordIds:
    """Every row's word ids for the built-in word students, whose `encode_texts` is vocab.encode over `tokenize`:
    tokenised once per (cache, vocabulary, truncation) and held per shard as a dense (rows, width) matrix padded
    with <pad> = 0 plus each row's word count, so a batch is one slice `ids[idx, :L]`. With a `store` folder the
    matrices are written there once (`<store>/<digest of the inputs>/`, plain .npy files, moved into place whole)
    and memory-mapped by every later run and worker that uses the same vocabulary on the same cache."""

    FORMAT = 1

    def __init__(self, cache: TeacherCache, sets: list[str], vocab, max_len: int | None, pair: bool,
                 store: str | os.PathLike | None = None):
        from trainer.run_key import cache_fingerprint

        self.pair, self.key = pair, self.key_of(sets, vocab, max_len, pair)
        infos = cache.shards(sets)
        digest = hashlib.sha256(json.dumps([self.FORMAT, cache_fingerprint(cache), self.key]).encode()).hexdigest()
        self.folder = Path(store) / digest[:32] if store is not None else None
        if self.folder is not None and self.folder.is_dir():
            self.shards = self._load(self.folder, infos)
        else:
            self.shards = self._tokenise(cache, infos, vocab, max_len)
            if self.folder is not None:
                self._save(self.folder)

    @staticmethod
    def key_of(sets: list[str], vocab, max_len: int | None, pair: bool) -> str:
        """Equal for tables that hold the same ids: same sets, words in the same order, truncation and pairing."""
        words = hashlib.sha256("\n".join(vocab.itos).encode()).hexdigest()
        return json.dumps([list(sets), words, max_len, pair])

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_b") if self.pair else ("",)

    def _tokenise(self, cache: TeacherCache, infos, vocab, max_len: int | None) -> dict:
        rows = {(info.name, suffix): [vocab.ids(t, max_len) for t in
                                      cache.reader(info).table.column("text" + suffix).to_pylist()]
                for info in infos for suffix in self._suffixes()}
        width = max([len(r) for ids in rows.values() for r in ids] or [1])
        shards: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {info.name: {} for info in infos}
        for (name, suffix), ids in rows.items():
            lengths = np.fromiter(map(len, ids), np.int64, len(ids))
            dense = np.zeros((len(ids), width), np.int32)
            dense[np.arange(width)[None, :] < lengths[:, None]] = np.fromiter(
                (i for r in ids for i in r), np.int32, int(lengths.sum()))
            shards[name][suffix] = (dense, lengths)
        return shards

    def _save(self, folder: Path) -> None:
        """All shards' matrices (+ index.json, their names and row counts) into a temporary sibling, then renamed
        into place: a concurrent run that got there first wins and this one's copy is dropped (same ids)."""
        tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for n, (name, parts) in enumerate(self.shards.items()):
            for suffix, (dense, lengths) in parts.items():
                _save_synced(tmp / f"{n}{suffix}.ids.npy", dense)
                _save_synced(tmp / f"{n}{suffix}.lengths.npy", lengths)
        atomic_write_text(tmp / "index.json", json.dumps({"shards": {name: len(parts[""][0])
                                                                     for name, parts in self.shards.items()}}))
        try:
            os.rename(tmp, folder)
            fsync_dir(folder.parent)
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        self.shards = self._load(folder, [])

    def _load(self, folder: Path, infos) -> dict:
        """The stored matrices, memory-mapped (numbers only: nothing is unpickled); a store whose shards or row
        counts differ from the cache's is refused by name."""
        index = json.loads((folder / "index.json").read_text())["shards"]
        want = {i.name: i.rows for i in infos} or index
        shards = {}
        for n, (name, rows) in enumerate(index.items()):
            shards[name] = {}
            for suffix in self._suffixes():
                dense = np.load(folder / f"{n}{suffix}.ids.npy", mmap_mode="r")
                lengths = np.load(folder / f"{n}{suffix}.lengths.npy", mmap_mode="r")
                if len(dense) != rows or len(lengths) != rows:
                    raise UserError(f"word-id store {folder}: shard {name}{suffix} holds {len(dense)} rows, its "
                                    f"index {rows}; delete that folder to tokenise again")
                shards[name][suffix] = (dense, lengths)
        if index != want:
            raise UserError(f"word-id store {folder} holds shards {index}, the cache {want}; delete that folder "
                            "to tokenise again")
        return shards

    def __getstate__(self) -> dict:
        """A DataLoader worker gets the folder, not a pickled copy of the matrices, when they are stored."""
        state = dict(self.__dict__)
        if self.folder is not None:
            state["shards"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.shards is None:
            self.shards = self._load(self.folder, [])

    def block(self, shard: str, start: int, stop: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(ids (rows, width) int64, words per row) of rows [start, stop) of a shard."""
        return {k: (dense[start:stop].astype(np.int64), np.asarray(lengths[start:stop]))
                for k, (dense, lengths) in self.shards[shard].items()}


@dataclass
class Window:
    """A window's rows as arrays (`Columns` of its blocks joined), the strings the batches carry and the word ids."""

    cols: Columns
    strings: dict[str, np.ndarray]
    words: dict[str, tuple[np.ndarray, np.ndarray]]  # suffix -> (ids (rows, width), words per row)
    below: np.ndarray  # below[n, j] = j < n: the validity row of n tokens, looked up rather than compared per batch

    @classmethod
    def concat(cls, parts: list[Columns], strings: dict, words: list[dict]) -> "Window":
        lengths = np.concatenate([p.lengths for p in parts])
        cols = Columns(int(len(lengths)), lengths, np.concatenate([p.labels for p in parts]),
                       {k: np.concatenate([p.rows[k] for p in parts]) for k in parts[0].rows},
                       {k: _join([p.ragged[k] for p in parts]) for k in parts[0].ragged})
        joined = {k: (np.concatenate([w[k][0] for w in words]), np.concatenate([w[k][1] for w in words]))
                  for k in (words[0] if words else {})}
        width = int(lengths.max(initial=0))
        return cls(cols, strings, joined, np.arange(width)[None, :] < np.arange(width + 1)[:, None])

    def batch(self, idx: np.ndarray, layout: dict) -> dict:
        """Rows `idx` of the window -> padded tensors with a validity mask; teacher fields stay float16 (and
        token fields in their stored order, transposed as views) until to_device."""
        c = self.cols
        lengths = c.lengths[idx]
        L = int(lengths.max())
        valid = self.below[lengths, :L]
        batch = {k: v[idx].tolist() for k, v in self.strings.items()}
        batch.update(labels=torch.from_numpy(c.labels[idx]), layout=layout, teacher_mask=torch.from_numpy(valid))
        for name, key in (("logits", "teacher_logits"), ("cls", "teacher_cls"), ("teacher2_logits", "teacher2_logits")):
            if name in c.rows:
                batch[key] = torch.from_numpy(c.rows[name].take(idx, axis=0))  # `take`: leaner than [idx] for rows
        if "input_ids" in c.ragged:
            flat, starts = c.ragged["input_ids"]
            batch["input_ids"] = torch.from_numpy(_pad(flat, starts[idx], valid))
            batch["attention_mask"] = batch["teacher_mask"].long()
        if "hidden" in c.ragged:  # (B, L, n, d) -> (B, n, L, d), a view: to_device makes it contiguous
            flat, starts = c.ragged["hidden"]
            batch["teacher_hidden"] = torch.from_numpy(_pad(flat, starts[idx], valid)).transpose(1, 2)
        if "values" in c.ragged:
            flat, starts = c.ragged["values"]
            batch["teacher_values"] = torch.from_numpy(_pad(flat, starts[idx], valid))
        if "attention" in c.ragged:  # rows of (len², n, H) -> (B, n, H, L, L), zero outside the valid block
            flat, starts = c.ragged["attention"]
            r = np.arange(L)
            block = valid[:, :, None] & valid[:, None, :]
            src = starts[idx][:, None, None] + r[None, :, None] * lengths[:, None, None] + r[None, None, :]
            out = np.zeros((len(idx), L, L, *flat.shape[1:]), flat.dtype)
            out[block] = flat[src[block]]
            batch["teacher_attention"] = torch.from_numpy(out).permute(0, 3, 4, 1, 2)
        for suffix, (ids, words) in self.words.items():  # word students: what encode_texts would give
            n = words[idx]
            batch[f"word_ids{suffix}"] = torch.from_numpy(ids[idx, : int(n.max())])
            batch[f"word_lengths{suffix}"] = torch.from_numpy(n)
        return batch


def _save_synced(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _join(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged (flat, row starts) pieces as one: starts shifted by the positions before them."""
    shift = np.cumsum([0] + [len(flat) for flat, _ in parts[:-1]])
    return np.concatenate([f for f, _ in parts]), np.concatenate([s + k for (_, s), k in zip(parts, shift)])


def to_device(batch: dict, device) -> dict:
    """A batch on the device the student trains on, teacher fields widened there: float16 travels as float16
    (half the bytes to a GPU) and becomes a contiguous float32 tensor on the device, conversion and any
    transpose's reordering in one pass."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.dtype == torch.float16:
                v = v.to(torch.float32, memory_format=torch.contiguous_format)
        out[k] = v
    return out


def _pad(flat: np.ndarray, starts: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows flat[start : start + length] as a zero-padded (B, L, ...) array of flat's dtype; `valid` (B, L) is the
    batch's validity mask, computed once for all its token fields."""
    B, L = valid.shape
    out = np.zeros((B, L, *flat.shape[1:]), flat.dtype)
    out[valid] = flat[(starts[:, None] + np.arange(L)[None, :])[valid]]
    return out
