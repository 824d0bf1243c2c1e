"""Chunked, resumable, deterministic output of one augmentation method.

The input rows are cut into fixed chunks; each chunk becomes one part file, renamed into
place when complete, with its counts in the Parquet metadata. A restarted run skips
chunks whose part reads back whole, so an interrupted run resumes and yields the same
bytes. Parts are a cache, not the result: they are not fsynced (a part torn by a power
cut fails to read back and is recomputed); the combined file is. Each source
row's random stream is seeded from (method, seed, row_id), never from worker order, and
parts are combined in source order: the bytes do not depend on the number of workers.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from data.faults import crash_point
from data.io import UserError, atomic_write_bytes, atomic_write_text, fsync_dir
from data.rows import ROW_SCHEMA, read_rows


@dataclass
class Samples:
    """A method's output for one chunk: which source row, the new text, the draw index."""

    src: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    sample: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # "duplicates", "skip:<reason>", other notes

    def add(self, src: int, text: str, sample: int) -> None:
        self.src.append(src)
        self.text.append(text)
        self.sample.append(sample)


class Augmenter(Protocol):
    name: str
    parallel: bool  # True: chunks may run in worker processes
    start_method: str  # "fork" (cheap, shares memory) or "spawn" (workers rebuild heavy state)

    def prepare(self, rows: pa.Table) -> dict: ...  # returns the identity recorded in provenance

    def process(self, chunk: pa.Table, start: int) -> Samples: ...  # start = chunk's first row index


def row_seed(seed: int, method: str, row_id: str) -> int:
    """A source row's RNG seed: depends on the row, not on chunking or workers."""
    return int.from_bytes(hashlib.sha256(f"{method}\x1f{seed}\x1f{row_id}".encode()).digest()[:8], "little")


def input_key(rows: pa.Table) -> str:
    """Hash of the input rows in order (the chunk layout depends on order)."""
    h = hashlib.sha256()
    for col in ("row_id", "text", "text_b"):
        for v in rows.column(col).to_pylist():
            h.update((v if v is not None else "\x00").encode("utf-8", "surrogatepass") + b"\x1f")
    return h.hexdigest()[:16]


def stable_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def provenance_prefix(method: str, params: dict, seed: int, identity: dict) -> str:
    """JSON of everything but the sample index, left open so each row appends `"sample":i}`."""
    head = json.dumps({"method": method, "params": params, "seed": seed, **identity},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return head[:-1] + ',"sample":'


def write_parquet(table: pa.Table, path: Path) -> None:
    """Any Arrow table (caches, tag tables) as zstd Parquet, atomically."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _row_ids(sources: list[str], texts: list[str]) -> list[str]:
    """data.rows.make_row_id(source, text) in one hash update per row (tests check they agree)."""
    sha1 = hashlib.sha1
    return [sha1(f"{s}\x1f{t}\x1f\x1f".encode("utf-8", "surrogatepass")).hexdigest()[:16]
            for s, t in zip(sources, texts)]


def to_rows(chunk: pa.Table, s: Samples, method: str, prefix: str) -> pa.Table:
    """ROW_SCHEMA rows: no gold label is copied; text_b (pairs) is kept as is."""
    ids = chunk.column("row_id").to_pylist()
    text_b = chunk.column("text_b").to_pylist()
    split = chunk.column("split").to_pylist()
    src = [ids[i] for i in s.src]
    return pa.Table.from_pydict({
        "row_id": _row_ids(src, s.text),
        "text": s.text,
        "text_b": [text_b[i] for i in s.src],
        "label": pa.nulls(len(s.src), pa.int32()),
        "split": [split[i] for i in s.src],
        "source_id": src,
        "method": [method] * len(s.src),
        "provenance": [f"{prefix}{k}}}" for k in s.sample],
    }, schema=ROW_SCHEMA)


PART_COUNTS = b"augment_counts"

# One job per process: set before the pool forks (or passed to the initializer).
_JOB: dict = {}


def _init(job: dict) -> None:
    _JOB.clear()
    _JOB.update(job)


def _do_chunk(i: int) -> tuple[int, dict]:
    """Process chunk i and commit its part (Parquet first, then the marker)."""
    aug, rows, size, parts, prefix = (_JOB[k] for k in ("aug", "rows", "size", "parts", "prefix"))
    start = i * size
    chunk = rows.slice(start, size)
    s = aug.process(chunk, start)
    counts = dict(s.counts, rows_in=chunk.num_rows, rows_out=len(s.text))
    _write_part(to_rows(chunk, s, aug.name, prefix), counts, parts / f"part-{i:05d}.parquet")
    crash_point("augment-part-committed")
    return i, counts


def _write_part(table: pa.Table, counts: dict, path: Path) -> None:
    """Temp file + rename (no fsync: see the module note); counts travel in the metadata."""
    table = table.replace_schema_metadata({PART_COUNTS: json.dumps(counts, sort_keys=True).encode()})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _part_counts(path: Path) -> dict | None:
    """The counts of a complete part; None when missing, torn or not ours (recompute it)."""
    try:
        meta = pq.read_metadata(path)
        counts = json.loads((meta.metadata or {})[PART_COUNTS])
        return counts if counts.get("rows_out") == meta.num_rows else None
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def _run_pool(todo: list[int], workers: int, job: dict, parts: Path):
    """Chunks in worker processes; a worker that dies (OOM, kill -9) fails the run, never hangs it."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    method = getattr(job["aug"], "start_method", "fork")
    ctx = mp.get_context(method if method in mp.get_all_start_methods() else "spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(job,)) as ex:
            for f in as_completed([ex.submit(_do_chunk, i) for i in todo]):
                yield f.result()
    except BrokenProcessPool:
        raise UserError(f"a worker process died (killed or out of memory); finished chunks are kept in {parts}: "
                        "run the same command again to resume") from None


def run_chunks(aug: Augmenter, rows: pa.Table, parts: Path, size: int, prefix: str, workers: int,
               progress: bool) -> list[dict]:
    """Process every chunk without a committed part; return the per-chunk counts in order."""
    from tqdm import tqdm

    parts.mkdir(parents=True, exist_ok=True)
    n = max(1, -(-rows.num_rows // size))
    counts: dict[int, dict] = {}
    for i in range(n):
        done = _part_counts(parts / f"part-{i:05d}.parquet")
        if done is not None:
            counts[i] = done
    todo = [i for i in range(n) if i not in counts]
    job = {"aug": aug, "rows": rows, "size": size, "parts": parts, "prefix": prefix}
    bar = tqdm(total=rows.num_rows, initial=sum(c["rows_in"] for c in counts.values()), unit="row",
               desc=aug.name, disable=not progress, leave=False)
    try:
        if aug.parallel and workers > 1 and len(todo) > 1:
            for i, c in _run_pool(todo, min(workers, len(todo)), job, parts):
                counts[i] = c
                bar.update(c["rows_in"])
        else:
            _init(job)
            for i in todo:
                counts[i] = _do_chunk(i)[1]
                bar.update(counts[i]["rows_in"])
    finally:
        bar.close()
    return [counts[i] for i in range(n)]


def combine_tables(tables, out: Path) -> int:
    """Stream tables into one Parquet file (one row group each, empty ones skipped), then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    total = 0
    try:
        with pq.ParquetWriter(tmp, ROW_SCHEMA, compression="zstd") as w:
            for t in tables:
                if t.num_rows:
                    w.write_table(t.cast(ROW_SCHEMA), row_group_size=t.num_rows)
                    total += t.num_rows
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return total


def summarise(method: str, run_key: str, per_chunk: list[dict], extra: dict) -> dict:
    """Totals over chunks: rows in/out, duplicates, skipped rows by reason, other notes."""
    total: Counter = Counter()
    for c in per_chunk:
        total.update(c)
    skipped = {k.split(":", 1)[1]: v for k, v in sorted(total.items()) if k.startswith("skip:")}
    notes = {k: v for k, v in sorted(total.items())
             if not k.startswith("skip:") and k not in ("rows_in", "rows_out", "duplicates")}
    return {"method": method, "run_key": run_key, "rows_in": total["rows_in"], "rows_out": total["rows_out"],
            "duplicates_dropped": total["duplicates"], "skipped": skipped, "notes": notes,
            "rows_out_per_chunk": [c["rows_out"] for c in per_chunk], **extra}


def run_method(aug: Augmenter, rows: pa.Table, *, out_dir: Path, params: dict, seed: int, chunk_rows: int,
               workers: int, progress: bool) -> dict:
    """Augment `rows` with one method into out_dir/<name>.parquet (+ .summary.json); resumable."""
    t0 = time.perf_counter()
    out, summary_path = out_dir / f"{aug.name}.parquet", out_dir / f"{aug.name}.summary.json"
    identity = aug.prepare(rows)
    run_key = stable_key(aug.name, params, seed, chunk_rows, input_key(rows), identity)
    if out.is_file() and summary_path.is_file():
        old = json.loads(summary_path.read_text())
        if old.get("run_key") == run_key:
            return dict(old, reused=True)
    parts_root = out_dir / ".parts"
    for stale in parts_root.glob(f"{aug.name}-*"):  # parts of another config or input are useless
        if stale.name != f"{aug.name}-{run_key}":
            shutil.rmtree(stale, ignore_errors=True)
    parts = parts_root / f"{aug.name}-{run_key}"
    prefix = provenance_prefix(aug.name, params, seed, identity)
    per_chunk = run_chunks(aug, rows, parts, chunk_rows, prefix, workers, progress)
    paths = [parts / f"part-{i:05d}.parquet" for i in range(len(per_chunk))]
    combine_tables((read_rows(p) for p in paths), out)
    summary = summarise(aug.name, run_key, per_chunk, {
        "params": params, "seed": seed, "identity": identity, "chunk_rows": chunk_rows,
        "output": str(out), "seconds": round(time.perf_counter() - t0, 3)})
    atomic_write_text(summary_path, json.dumps(summary, indent=2, ensure_ascii=False))
    shutil.rmtree(parts, ignore_errors=True)
    return summary
