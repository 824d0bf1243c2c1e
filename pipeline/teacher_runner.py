"""The teacher side of a caching pass: tokenise, forward with capture, hand host arrays to the writer.

TeacherRunner batches rows by length and runs the teacher under inference_mode (bf16 on a
GPU), copying outputs to pinned host buffers without waiting; WriterThread splits batches
into per-row valid blocks and commits finished shards on a small thread pool.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain

import numpy as np
import pyarrow as pa
import torch

from pipeline.attention_capture import AttentionCapture
from pipeline.cache_schema import FieldLayout, segment_ids
from pipeline.cache_writer import CacheWriter, ShardBuffer


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
        lay = self.layout
        result = {"logits": out.logits.float()}
        if lay.cls_layers:
            result["cls"] = torch.stack([out.hidden_states[l][:, 0] for l in lay.cls_layers], 1).half()
        if lay.hidden_layers:
            result["hidden"] = torch.stack([out.hidden_states[l] for l in lay.hidden_layers], 2).half()
        if lay.attention_layers:  # (B, H, L, L) per layer -> (B, L, L, n_layers, H)
            result["attention"] = torch.stack([cap.scores[l] for l in lay.attention_layers], -1).permute(
                0, 2, 3, 4, 1).half()
        if lay.values_layer is not None:
            result["values"] = cap.values.half()
        if self.device.type != "cuda":
            return {k: v.to("cpu") for k, v in result.items()}
        # device->host copies into pinned buffers, left running: the writer thread waits on the event
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                for k, v in result.items()}
        done = torch.cuda.Event()
        done.record()
        host["_copied"] = done
        return host


def _split_batch(buf: ShardBuffer, columns: dict[str, list], out: dict) -> None:
    """Add one batch: whole-batch logits/[CLS], per-row valid blocks of the ragged tensors."""
    copied = out.pop("_copied", None)
    if copied is not None:  # the batch's device->host copy must be done before numpy reads it
        copied.synchronize()
    np_out = {k: v.numpy() for k, v in out.items()}
    lengths = columns["length"]
    cls = np_out.get("cls")
    att = np_out.get("attention")
    buf.add_batch(columns, np_out["logits"], None if cls is None else cls.reshape(len(lengths), -1),
                  hidden=[np_out["hidden"][i, :L] for i, L in enumerate(lengths)] if "hidden" in np_out else (),
                  attention=[att[i, :L, :L].reshape(L * L, *att.shape[3:]) for i, L in enumerate(lengths)]
                  if att is not None else (),
                  values=[np_out["values"][i, :L] for i, L in enumerate(lengths)] if "values" in np_out else ())


class WriterThread(threading.Thread):
    """Consumes (buffer, rows, outputs) and ('commit', buffer) items; errors surface on join.

    Shard commits (compression, checksums, fsync) run on a small pool so that a GPU that
    outpaces one compressing thread is not held back; each shard's files are its own, and
    only the manifest merge is serialised. At most `commit_threads` shards are in flight.
    """

    def __init__(self, writer: CacheWriter, maxsize: int, merge: bool, commit_threads: int = 1):
        super().__init__(daemon=True)
        self.writer, self.q, self.merge, self.error = writer, queue.Queue(maxsize), merge, None
        self.pool = ThreadPoolExecutor(max(1, commit_threads), thread_name_prefix="shard-commit")
        self.slots = threading.Semaphore(max(1, commit_threads))
        self.merge_lock = threading.Lock()
        self.pending: list[Future] = []

    def _commit(self, buf: ShardBuffer) -> None:
        try:
            self.writer.commit(buf, merge=False)
            if self.merge:
                with self.merge_lock:
                    self.writer.merge_records()
        finally:
            self.slots.release()

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            try:
                if item[0] == "commit":
                    self.slots.acquire()  # bounded memory: wait for a free commit slot
                    self.pending.append(self.pool.submit(self._commit, item[1]))
                else:
                    _split_batch(*item)
                self._check()
            except BaseException as e:  # surfaced in the main thread
                self.error = e

    def _check(self) -> None:
        for f in [f for f in self.pending if f.done()]:
            self.pending.remove(f)
            f.result()

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        self.pool.shutdown(wait=True)
        if self.error is None:
            try:
                self._check()
            except BaseException as e:
                self.error = e
        if self.error is not None:
            raise self.error
