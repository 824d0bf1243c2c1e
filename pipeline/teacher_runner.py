"""The teacher side of a caching pass: tokenise, forward with capture, hand host arrays to the writer.

TeacherRunner batches rows by length and runs the teacher under inference_mode (bf16 on a
GPU), packing the token-level fields to their valid positions and copying them to pinned host
buffers without waiting; WriterThread adds batches to their shard and commits finished shards on
a small thread pool.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain

import numpy as np
import pyarrow as pa
import torch

from pipeline.attention_capture import AttentionCapture
from pipeline.cache_schema import FieldLayout, segment_ids
from pipeline.cache_writer import CacheWriter, ShardBuffer
from pipeline.quantize import quantize


class TeacherRunner:
    """Tokenise, batch by length, forward with capture, hand CPU tensors to the writer."""

    def __init__(self, model, tokenizer, layout: FieldLayout, max_length: int, device, bf16: bool,
                 given_logits: dict | None = None):
        self.model, self.tok, self.layout, self.max_length = model, tokenizer, layout, max_length
        self.device, self.bf16 = device, bf16 and device.type == "cuda"
        self.tok.padding_side = "right"
        self.capture = AttentionCapture(model, layers=layout.attention_layers, values_layer=layout.values_layer)
        self.need_hidden = bool(layout.cls_layers or layout.hidden_layers)
        self.given_logits = given_logits  # row id -> the user's teacher logits (cache.logits_from=data)

    def tokenize(self, table: pa.Table) -> tuple[list[list[int]], list[bool]]:
        texts, texts_b = table.column("text").to_pylist(), table.column("text_b").to_pylist()
        pairs = texts_b if any(t is not None for t in texts_b) else None
        ids_only = dict(return_attention_mask=False, return_token_type_ids=False, verbose=False)
        full = self.tok(texts, pairs, truncation=False, **ids_only)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        long = [i for i, t in enumerate(truncated) if t]
        if long:  # the tokenizer's own truncation (pairs: longest first), for the long rows only
            cut = self.tok([texts[i] for i in long], [pairs[i] for i in long] if pairs else None, truncation=True,
                           max_length=self.max_length, **ids_only)["input_ids"]
            for i, ids in zip(long, cut):
                full[i] = ids
        return full, truncated

    @torch.inference_mode()
    def forward(self, ids: list[list[int]]) -> dict:
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        valid = np.arange(lengths.max())[None, :] < lengths[:, None]
        padded = np.full(valid.shape, self.tok.pad_token_id or 0, np.int64)
        padded[valid] = np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum()))
        input_ids, mask = torch.from_numpy(padded), torch.from_numpy(valid.astype(np.int64))
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if "token_type_ids" in self.tok.model_input_names:
            inputs["token_type_ids"] = segment_ids(input_ids, self.tok.sep_token_id).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16), self.capture as cap:
            out = self.model(**inputs, output_hidden_states=self.need_hidden)
        result = {"logits": out.logits.float(), **self._token_fields(out, cap, valid)}
        if self.device.type != "cuda":
            return {k: v.to("cpu") for k, v in result.items()}
        # device->host copies into pinned buffers, left running: the writer thread waits on the event
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                for k, v in result.items()}
        done = torch.cuda.Event()
        done.record()
        host["_copied"] = done
        return host

    def _token_fields(self, out, cap, valid: np.ndarray) -> dict:
        """[CLS] of each batch row, and the Zarr fields packed: only the valid positions of each row, rows one after
        another (hidden/values: Σ len positions; attention: Σ len², a row's (len, len) block row-major), so only
        those bytes leave the device and the writer slices nothing. int8 (cache.quantize) is applied here too.
        The positions are picked with indices computed on the host: a boolean mask would make the host wait for
        the device to learn the output's size."""
        lay, fields, int8 = self.layout, {}, self.layout.quantize == "int8"
        pair = valid[:, :, None] & valid[:, None, :]  # (B, L, L) a row's own block

        def pick(x, mask: np.ndarray, dims: int):  # x's first `dims` dims flattened, the `mask` positions kept
            index = torch.from_numpy(np.flatnonzero(mask)).to(x.device, non_blocking=True)
            return x.flatten(0, dims - 1).index_select(0, index)

        if lay.cls_layers:
            fields["cls"] = torch.stack([out.hidden_states[l][:, 0] for l in lay.cls_layers], 1).half()
        if lay.hidden_layers:
            hidden = pick(torch.stack([out.hidden_states[l] for l in lay.hidden_layers], 2), valid, 2)  # (Σ len, n, d)
            fields.update(self._vectors("hidden", hidden, int8))
        if lay.attention_layers:  # (B, H, L, L) per layer -> (B, L, L, n_layers, H)
            att = torch.stack([cap.scores[l] for l in lay.attention_layers], -1).permute(0, 2, 3, 4, 1)
            if int8:  # one step per row, layer and head, from that row's valid block only
                outside = torch.from_numpy(~pair).to(att.device, non_blocking=True)[..., None, None]
                q, scale = quantize(att, att.abs().masked_fill(outside, 0).amax(dim=(1, 2), keepdim=True))
                fields.update(attention=pick(q, pair, 3), attention_scale=scale[:, 0, 0])  # (Σ len², n, H), (B, n, H)
            else:
                fields["attention"] = pick(att, pair, 3).half()
        if lay.values_layer is not None:
            fields.update(self._vectors("values", pick(cap.values, valid, 2), int8))  # (Σ len, d)
        return fields

    @staticmethod
    def _vectors(name: str, x, int8: bool) -> dict:
        if not int8:
            return {name: x.half()}
        q, scale = quantize(x, x.abs().amax(dim=-1, keepdim=True))  # one step per token vector
        return {name: q, f"{name}_scale": scale[..., 0]}


def _add_batch(buf: ShardBuffer, columns: dict[str, list], out: dict) -> None:
    """Add one batch to its shard, once its device->host copy is done."""
    copied = out.pop("_copied", None)
    if copied is not None:
        copied.synchronize()
    buf.add_batch(columns, {k: v.numpy() for k, v in out.items()})


class WriterThread(threading.Thread):
    """Consumes (buffer, rows, outputs) and ('commit', buffer) items; errors surface on join.

    Shard commits (compression, checksums, fsync) run on a small pool so that a GPU that
    outpaces one compressing thread is not held back; each shard's files are its own, and
    only the manifest merge is serialised. At most `commit_threads` shards are being encoded and
    written; each then waits for its fsync, rename and record on one sealing thread (at most
    `SEALING` of them), so the next shard's encoding overlaps the disk's flush of the last.
    """

    SEALING = 2  # shards written but not yet durable (their bytes are in the page cache, not this process)
    MERGE_EVERY_S = 5.0  # the manifest lists a committed shard at most this late (its record is the commit point)

    def __init__(self, writer: CacheWriter, maxsize: int, merge: bool, commit_threads: int = 1):
        super().__init__(daemon=True)
        self.writer, self.q, self.merge, self.error = writer, queue.Queue(maxsize), merge, None
        self.pool = ThreadPoolExecutor(max(1, commit_threads), thread_name_prefix="shard-commit")
        self.slots = threading.Semaphore(max(1, commit_threads))
        self.sealer = ThreadPoolExecutor(1, thread_name_prefix="shard-seal")
        self.sealing = threading.Semaphore(self.SEALING)
        self.merge_lock = threading.Lock()
        self._merged = time.monotonic()  # when the manifest was last merged
        self.pending: list[Future] = []
        self.waited = 0.0  # seconds the teacher side spent blocked on a full queue or on the last commits

    def _commit(self, buf: ShardBuffer) -> Future:
        """Write the shard's files, then queue its sealing (whose future `_check` follows)."""
        try:
            written = self.writer.write_files(buf)
            self.sealing.acquire()
        finally:
            self.slots.release()
        return self.sealer.submit(self._seal, written)

    def _seal(self, written) -> None:
        try:
            self.writer.seal(written)
            if self.merge and time.monotonic() - self._merged >= self.MERGE_EVERY_S:
                self._merge()
        finally:
            self.sealing.release()

    def _merge(self) -> None:
        """The manifest and stamp brought up to date: a handful of small fsynced files, so not after every
        shard; `finish` merges the last ones, and a run resumed after a crash merges every record first."""
        with self.merge_lock, self.writer.profile.step("record"):
            self.writer.merge_records()
            self._merged = time.monotonic()

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                if item[0] == "commit":
                    self.slots.acquire()  # bounded memory: wait for a free commit slot
                    self.pending.append(self.pool.submit(self._commit, item[1]))
                else:
                    with self.writer.profile.step("add"):
                        _add_batch(*item)
                self._check()
            except BaseException as e:  # surfaced in the main thread
                self.error = e

    def _check(self) -> None:
        """Raise the first failure of a finished commit; a written shard's sealing is followed from then on."""
        for f in [f for f in self.pending if f.done()]:
            self.pending.remove(f)
            sealing = f.result()
            if sealing is not None:
                self.pending.append(sealing)

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.q.put(item)
        self.waited += time.perf_counter() - t0

    def finish(self) -> None:
        t0 = time.perf_counter()
        self.q.put(None)
        self.join()
        self.pool.shutdown(wait=True)
        try:
            self._check()  # every written shard's sealing is now pending
        except BaseException as e:
            self.error = self.error or e
        self.sealer.shutdown(wait=True)
        self.waited += time.perf_counter() - t0
        if self.error is None:
            try:
                self._check()
            except BaseException as e:
                self.error = e
        if self.merge:  # the shards committed before any failure are listed too
            try:
                self._merge()
            except BaseException as e:
                self.error = self.error or e
        if self.error is not None:
            raise self.error
