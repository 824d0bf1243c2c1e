"""`python -m pipeline.teacher_cache`: run the teacher once and store what distillation needs.

Rows are planned into shards per set (sorted by row id, `shard_rows` each), so a run
that stops after k committed shards plans the same remaining shards when resumed.
Inside a shard rows are sorted by length (padding only within a batch). The teacher
runs under inference_mode (bf16 autocast on GPU); a writer thread slices per-row
arrays and commits shards while the next batches compute.
"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from data.config import parse_cli, save_config
from data.io import UserError, run_cli
from data.prepare import load_meta, load_split, prepare
from data.rows import read_rows, table_fingerprint
from pipeline.attention_capture import AttentionCapture
from pipeline.cache_plan import (cache_lock, clear_plan, load_plan, make_plan, plan_shards, rank_and_world, rows_of,
                                 save_plan)
from pipeline.cache_schema import MANIFEST, FieldLayout, Manifest, TeacherInfo, arrow_path
from pipeline.cache_sync import check_target, push_built
from pipeline.cache_writer import CacheWriter, ShardBuffer
from pipeline.run_config import RunConfig, evenly_spaced, parse_layers
from pipeline.teacher import finetune, is_finetuned, load_classifier, pick_device


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def teacher_info(path: Path, model) -> TeacherInfo:
    weights = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    tok_files = [p for p in path.iterdir() if p.name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                                                          "special_tokens_map.json", "sentencepiece.bpe.model")]
    c = model.config
    return TeacherInfo(name=path.name, path=str(path.resolve()), model_type=c.model_type,
                       num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                       num_labels=c.num_labels, weights_sha256=_hash_files(weights),
                       tokenizer_sha256=_hash_files(tok_files))


def resolve_layout(cfg, num_layers: int) -> FieldLayout:
    auto = evenly_spaced(num_layers)
    return FieldLayout(
        cls_layers=parse_layers(cfg.cls_layers, num_layers, auto=list(range(num_layers + 1)), lowest=0,
                                what="cls_layers"),
        hidden_layers=parse_layers(cfg.hidden_layers, num_layers, auto=[0, *auto], lowest=0, what="hidden_layers"),
        attention_layers=parse_layers(cfg.attention_layers, num_layers, auto=auto, lowest=1,
                                      what="attention_layers"),
        values_layer=num_layers if cfg.store_values else None,
        zarr_codec=cfg.zarr_codec,
    )


def check_compatible(old: Manifest, new: Manifest, cache_dir: Path) -> None:
    """Refuse to extend a cache made by another teacher, tokenizer, length, layout or data."""
    checks = [
        ("teacher weights", old.teacher.weights_sha256, new.teacher.weights_sha256),
        ("tokenizer", old.teacher.tokenizer_sha256, new.teacher.tokenizer_sha256),
        ("max_length", old.max_length, new.max_length),
        ("label names", old.label_names, new.label_names),
        ("data set", old.data_name, new.data_name),
        ("stored layers", old.layout, new.layout),
    ]
    for what, a, b in checks:
        if a != b:
            raise UserError(f"cache {cache_dir} was built with a different {what} ({_short(a)} vs {_short(b)}); "
                            "use another cache.name or delete the cache")


def _short(x) -> str:
    s = str(x)
    return s[:12] if len(s) == 64 else s[:80]


def gather_sets(run: RunConfig, data_dir: Path) -> list[tuple[str, pa.Table]]:
    """The splits asked for, then every augmented set present (set name aug-<method>)."""
    sets = [(split, load_split(data_dir, split)) for split in run.cache.splits]
    aug_dir = Path(run.cache.augment_dir)
    if aug_dir.is_dir() and run.cache.use_augmented:
        for path in sorted(aug_dir.glob("*.parquet")):
            if run.cache.augment_sets and path.stem not in run.cache.augment_sets:
                continue
            sets.append((f"aug-{path.stem}", read_rows(path)))
    if run.cache.max_rows:
        sets = [(name, t.sort_by("row_id").slice(0, run.cache.max_rows)) for name, t in sets]
    return sets


def cached_ids(cache_dir: Path, manifest: Manifest) -> dict[str, set[str]]:
    """Row ids each set already holds, read from the shards' memory-mapped id columns."""
    done: dict[str, set[str]] = {}
    for s in manifest.shards:
        table = pa.ipc.open_file(pa.memory_map(str(arrow_path(cache_dir, s.name)))).read_all()
        done.setdefault(s.set, set()).update(table.column("row_id").to_pylist())
    return done


def current_plan(writer: CacheWriter, sets: list[tuple[str, pa.Table]], shard_rows: int) -> pa.Table:
    """Under the cache lock: merge committed shards, then the saved plan while it is unfinished,
    else a new plan of the rows no shard holds yet."""
    cache_dir = writer.dir
    with cache_lock(cache_dir):
        writer.manifest = Manifest.load(cache_dir)  # other ranks may have merged since
        writer.merge_records()
        plan = load_plan(cache_dir)
        if plan is not None and not set(plan_shards(plan)) <= set(writer.records()):
            return plan
        clear_plan(cache_dir)
        done = cached_ids(cache_dir, writer.manifest)
        for set_name, table in sets:
            stale = done.get(set_name, set()) - set(table.column("row_id").to_pylist())
            if stale:
                raise UserError(f"cache set {set_name!r} holds {len(stale)} row(s) not in the input "
                                f"(e.g. {min(stale)}): the data changed since the cache was built; use another "
                                "cache.name")
        next_index = {}
        for info in writer.manifest.shards:
            next_index[info.set] = max(next_index.get(info.set, 0), int(info.name.rsplit("-", 1)[1]) + 1)
        plan = make_plan(sets, done, next_index, shard_rows)
        if plan.num_rows:
            save_plan(cache_dir, plan)
        return plan


class TeacherRunner:
    """Tokenise, batch by length, forward with capture, hand CPU tensors to the writer."""

    def __init__(self, model, tokenizer, layout: FieldLayout, max_length: int, device, bf16: bool):
        self.model, self.tok, self.layout, self.max_length = model, tokenizer, layout, max_length
        self.device, self.bf16 = device, bf16 and device.type == "cuda"
        self.tok.padding_side = "right"
        self.capture = AttentionCapture(model, layers=layout.attention_layers, values_layer=layout.values_layer)
        self.need_hidden = bool(layout.cls_layers or layout.hidden_layers)

    def tokenize(self, table: pa.Table) -> tuple[list[list[int]], list[bool]]:
        texts, texts_b = table.column("text").to_pylist(), table.column("text_b").to_pylist()
        pairs = texts_b if any(t is not None for t in texts_b) else None
        full = self.tok(texts, pairs, truncation=False, verbose=False)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        if any(truncated):
            cut = self.tok(texts, pairs, truncation=True, max_length=self.max_length)["input_ids"]
            full = [c if t else f for f, c, t in zip(full, cut, truncated)]
        return full, truncated

    @torch.inference_mode()
    def forward(self, ids: list[list[int]]) -> dict:
        L = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), L), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(ids), L), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if "token_type_ids" in self.tok.model_input_names:
            inputs["token_type_ids"] = _token_types(input_ids, self.tok.sep_token_id).to(self.device)
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


def _token_types(input_ids: torch.Tensor, sep_id: int | None) -> torch.Tensor:
    """Segment ids for pairs: 1 after the first [SEP]."""
    if sep_id is None:
        return torch.zeros_like(input_ids)
    is_sep = (input_ids == sep_id).long()
    return ((torch.cumsum(is_sep, 1) - is_sep) > 0).long()


def _split_batch(buf: ShardBuffer, rows: list[dict], out: dict) -> None:
    """Per-row numpy arrays of the valid block only (after the batch's device->host copy is done)."""
    copied = out.pop("_copied", None)
    if copied is not None:
        copied.synchronize()
    np_out = {k: v.numpy() for k, v in out.items()}
    for i, row in enumerate(rows):
        L = row["length"]
        row["logits"] = np_out["logits"][i]
        if "cls" in np_out:
            row["cls"] = np_out["cls"][i].reshape(-1)
        buf.add(row,
                hidden=np_out["hidden"][i, :L] if "hidden" in np_out else None,
                attention=np_out["attention"][i, :L, :L].reshape(L * L, *np_out["attention"].shape[3:])
                if "attention" in np_out else None,
                values=np_out["values"][i, :L] if "values" in np_out else None)


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


def open_cache(run: RunConfig, model, teacher_dir: Path, meta: dict) -> CacheWriter:
    """Create the cache (manifest first) or check that an existing one may be extended."""
    layout = resolve_layout(run.cache, model.config.num_hidden_layers)
    new = Manifest(teacher=teacher_info(teacher_dir, model), layout=layout, max_length=run.teacher.max_length,
                   label_names=meta["label_names"], data_name=meta["name"])
    cache_dir = Path(run.cache.root) / (run.cache.name or teacher_dir.name)
    with cache_lock(cache_dir):
        if (cache_dir / MANIFEST).is_file():
            manifest = Manifest.load(cache_dir)
            check_compatible(manifest, new, cache_dir)
        else:
            manifest = new
            manifest.save(cache_dir)
    return CacheWriter(cache_dir, manifest)


def build_cache(run: RunConfig) -> dict:
    """Cache every row of the chosen sets not cached yet; this process's share under torchrun."""
    rank, world = rank_and_world(run.cache.rank, run.cache.world_size)
    check_target(run.cache.push_to)  # a missing fsspec backend fails now, not after the teacher ran
    data_dir = Path(run.data.out_dir)
    if not (data_dir / "meta.json").is_file():
        prepare(run.data)
    meta = load_meta(data_dir)
    teacher_dir = Path(run.teacher.out_dir)
    if not is_finetuned(teacher_dir):
        print(f"no fine-tuned teacher in {teacher_dir}: fine-tuning {run.teacher.checkpoint} first")
        finetune(run.teacher, str(data_dir))
    device = pick_device(run.cache.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    model, tokenizer = load_classifier(str(teacher_dir), len(meta["label_names"]))
    model.to(device).eval()
    writer = open_cache(run, model, teacher_dir, meta)
    sets = gather_sets(run, data_dir)
    writer.set_order = [name for name, _ in sets]
    tables = {name: t for name, t in sets}
    before = {k: len(v) for k, v in cached_ids(writer.dir, Manifest.load(writer.dir)).items()}
    runner = TeacherRunner(model, tokenizer, writer.manifest.layout, run.teacher.max_length, device, run.cache.bf16)
    bar = tqdm(desc=f"caching {writer.dir.name}" + (f" rank {rank}/{world}" if world > 1 else ""), unit="row",
               smoothing=0.1)
    t0 = time.time()
    try:
        truncated, written, removed = _run_plans(writer, runner, sets, tables, rank, world, run, bar)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # name the cache, not a temp file deep inside a Zarr store
            raise OSError(errno.ENOSPC, "no space left", str(writer.dir)) from None
        raise
    finally:
        bar.close()
    seconds = time.time() - t0
    with cache_lock(writer.dir):
        writer.manifest = Manifest.load(writer.dir)
        writer.merge_records()
        for set_name, table in sets:
            writer.manifest.sets.setdefault(set_name, {"rows": 0})["fingerprint"] = table_fingerprint(table)
        writer.manifest.save(writer.dir)
    if removed:
        print(f"resumed: removed {removed} unfinished shard file(s) of an interrupted run")
    manifest = writer.manifest
    save_config(run, writer.dir, "run_config.json")
    pending = load_plan(writer.dir) is not None
    push_built(run.cache.push_to, writer.dir, pending)  # cache.push_to: upload, manifest last
    return {"cache": str(writer.dir), "rank": rank, "world_size": world,
            "sets": {n: {"rows_in": t.num_rows, "already_cached": before.get(n, 0),
                         "cached_now": manifest.sets.get(n, {}).get("rows", 0)} for n, t in sets},
            "rows_written": written, "truncated": truncated, "seconds": round(seconds, 2),
            "rows_per_s": round(written / seconds, 1) if written else None, "shards": len(manifest.shards),
            "rows_in_cache": sum(s.rows for s in manifest.shards), "plan_pending": pending}


def _run_plans(writer, runner, sets, tables, rank: int, world: int, run: RunConfig, bar) -> tuple[int, int, int]:
    """Write this rank's shards of the current plan (then of a next one, while any)."""
    truncated = written = removed = 0
    while True:
        plan = current_plan(writer, sets, run.cache.shard_rows)
        recorded = set(writer.records())
        mine = [n for i, n in enumerate(plan_shards(plan)) if i % world == rank and n not in recorded]
        if not mine:
            break
        removed += len(writer.remove_unfinished(set(mine)))
        bar.total = (bar.total or 0) + sum(len(rows_of(plan, n)) for n in mine)
        thread = WriterThread(writer, run.cache.writer_queue, merge=world == 1,
                              commit_threads=run.cache.commit_threads)
        thread.start()
        try:
            for name in mine:
                set_name = name.rsplit("-", 1)[0]
                table = _take(tables[set_name], rows_of(plan, name))
                truncated += run_shard(runner, thread, set_name, name, table, run.cache.batch_size, bar)
                written += table.num_rows
        finally:
            thread.finish()
    return truncated, written, removed


def _take(table: pa.Table, row_ids: list[str]) -> pa.Table:
    index = {rid: i for i, rid in enumerate(table.column("row_id").to_pylist())}
    return table.take(pa.array([index[r] for r in row_ids], pa.int64()))


def run_shard(runner: TeacherRunner, thread: WriterThread, set_name: str, shard_name: str, table: pa.Table,
              batch_size: int, bar) -> int:
    ids, truncated = runner.tokenize(table)
    cols = table.to_pydict()
    order = np.argsort([len(x) for x in ids], kind="stable")
    buf = ShardBuffer(shard_name, set_name)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size].tolist()
        rows = [{"row_id": cols["row_id"][i], "set": set_name, "split": cols["split"][i],
                 "source_id": cols["source_id"][i], "method": cols["method"][i],
                 "provenance": cols["provenance"][i], "text": cols["text"][i], "text_b": cols["text_b"][i],
                 "label": cols["label"][i], "length": len(ids[i]), "truncated": truncated[i],
                 "input_ids": ids[i]} for i in idx]
        thread.put((buf, rows, runner.forward([ids[i] for i in idx])))
        bar.update(len(idx))
    thread.put(("commit", buf))
    return int(sum(truncated))


def main(argv: list[str]) -> int:
    run = parse_cli(RunConfig, argv)
    s = build_cache(run)
    for name, c in s["sets"].items():
        print(f"  {name:>14}: {c['rows_in']} rows in, {c['already_cached']} were cached before, "
              f"{c['cached_now']} cached now")
    who = f" (rank {s['rank']} of {s['world_size']})" if s["world_size"] > 1 else ""
    print(f"cache {s['cache']}: {s['rows_in_cache']} rows in {s['shards']} shards; wrote {s['rows_written']} rows{who} "
          f"({s['truncated']} truncated to max_length) in {s['seconds']} s, {s['rows_per_s']} rows/s"
          + ("; other ranks still have shards to write" if s["plan_pending"] else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
