"""Stream training batches from a teacher cache.

The plan of an epoch is a pure function of (seed, epoch, rank, worker): shard blocks
(`block_rows` rows, read whole so Zarr is read by slices, never row by row) are
shuffled and dealt round-robin to the world × workers consumers, so no row is seen
twice per epoch. Each consumer reads `window_blocks` blocks at a time (0: its whole
plan, a full shuffle), permutes their rows and cuts them into batches, optionally
bucketed by length. Shards are written in length order, so a small window holds a few
length clusters and bucketing makes batches length-homogeneous: both cost accuracy
(docs/methods.md, "Training stream"), which is why training defaults to a full shuffle. Because a window's permutation depends only on its index, a run resumed from
(epoch, batches done) skips whole windows and continues on the very same stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.cache_reader import TeacherCache


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
        if second_cache is not None:
            second = TeacherCache(second_cache)
            second.check_fields(("logits",))
            if second.label_names != cache.label_names:
                raise ValueError(f"second teacher cache {second_cache} has labels {second.label_names}, "
                                 f"first has {cache.label_names}")

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
        self._cache = TeacherCache(self.cache_dir)
        self._second = TeacherCache(self.second_dir) if self.second_dir is not None else None
        epoch = self.state.epoch
        skip = self.state.batches_done.get(consumer, 0)
        plan = self.consumer_plan(epoch, consumer, consumers)
        done = 0
        for index, window in enumerate(self.windows(plan)):
            batches = self._window_batches(epoch, consumer, index, window)
            if done + len(batches) <= skip:  # resumed: this whole window was consumed before
                done += len(batches)
                continue
            rows = self._read_window(window)
            for b in batches:
                if done < skip:
                    done += 1
                    continue
                done += 1
                yield self._collate([rows[i] for i in b], consumer, done)

    def _read_window(self, window: list) -> list[dict]:
        rows = []
        for name, start, stop in window:
            block = self._cache.reader(name).read(start, stop, self.fields)
            keys = list(block)
            # one dict per row, values block[k][i]: zip over the columns (lists, or arrays row by row)
            rows.extend(dict(zip(keys, values)) for values in zip(*block.values()))
        return rows

    def _collate(self, rows: list[dict], consumer: int, done: int) -> dict:
        batch = collate(rows, self.fields, self.layout)
        if self._second is not None:  # Dynamic KD's weak teacher: its logits, joined by row id
            extra = [self._second.lookup(r["row_id"], ("logits",)) for r in rows]
            batch["teacher2_logits"] = torch.from_numpy(np.stack([r["logits"] for r in extra]))
        if self.encode is not None:
            batch.update(self.encode(batch["text"], batch["text_b"]))
        batch["stream"] = {"consumer": consumer, "batches_done": done}
        return batch


def collate(rows: list[dict], fields, layout: dict) -> dict:
    """Rows of one batch -> padded float32 tensors with a validity mask."""
    B = len(rows)
    labels = [r["label"] for r in rows]
    batch = {"row_id": [r["row_id"] for r in rows], "text": [r["text"] for r in rows],
             "text_b": [r["text_b"] for r in rows], "set": [r["set"] for r in rows],
             "labels": torch.tensor([-100 if y is None else y for y in labels], dtype=torch.long),
             "layout": layout}
    lengths = [r["length"] for r in rows]
    L = max(lengths)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    batch["teacher_mask"] = mask
    if "logits" in fields:
        batch["teacher_logits"] = torch.from_numpy(np.stack([r["logits"] for r in rows]))
    if "cls" in fields:
        batch["teacher_cls"] = torch.from_numpy(np.stack([r["cls"] for r in rows]).astype(np.float32))
    if "input_ids" in fields:
        ids = torch.zeros(B, L, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : lengths[i]] = torch.from_numpy(r["input_ids"])
        batch["input_ids"], batch["attention_mask"] = ids, mask.long()
    for name, key in (("hidden", "teacher_hidden"), ("values", "teacher_values")):
        if name in fields:  # hidden (len, n, d) -> (B, n, L, d); values (len, d) -> (B, L, d)
            first = rows[0][name]
            out = torch.zeros(B, L, *first.shape[1:])
            for i, r in enumerate(rows):  # the fp16 block is cast to fp32 by the copy
                out[i, : lengths[i]] = torch.from_numpy(r[name])
            batch[key] = out.transpose(1, 2).contiguous() if name == "hidden" else out
    if "attention" in fields:  # (n, H, len, len) -> (B, n, H, L, L), zero outside the valid block
        n, H = rows[0]["attention"].shape[:2]
        out = torch.zeros(B, n, H, L, L)
        for i, r in enumerate(rows):
            out[i, :, :, : lengths[i], : lengths[i]] = torch.from_numpy(r["attention"])
        batch["teacher_attention"] = out
    return batch

