"""Write cache shards: buffer one shard's rows, then commit Arrow + Zarr atomically.

A shard is written under temporary names, fsynced, renamed into place, then recorded
(shards/<name>.json, atomically) and only then listed in the manifest (also replaced
atomically). Shard files without a record are unfinished work of an interrupted run and
are removed when their shard is written again. Each run first re-checks the committed
shards (`CacheWriter.repair`) and un-commits damaged ones, so they are written again.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data.faults import crash_point
from data.io import UserError, atomic_replace_dir, atomic_write_text, fsync_dir, tree_digest
from pipeline.cache_reader import Stamp, stat_digest
from pipeline.cache_schema import (INT8_MISSING, SHARD_DIR, FieldLayout, Manifest, ShardInfo, arrow_path,
                                   chunk_positions, record_path, row_columns, zarr_path)
from pipeline.shard_files import ShardFiles, WriteProfile

TMP_SUFFIX = ".partial"


def zarr_codecs(name: str):
    """The Zarr compressors of `cache.zarr_codec`; called before anything is written, so a typo
    cannot leave a manifest that names a codec no shard can be written with."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return [ZstdCodec(level=1)]
    if name == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    if name == "none":
        return None
    raise UserError(f"cache.zarr_codec: unknown codec {name!r}; use zstd, blosc-lz4 or none")


ZARR_ARRAYS = ("hidden", "hidden_scale", "attention", "attention_scale", "values", "values_scale")


class ShardBuffer:
    """Rows of one shard as they come out of the teacher, batch by batch.

    Row-level fields are kept as columns, logits/[CLS] as per-batch arrays, and each Zarr array as the
    per-batch blocks the teacher side packed (its rows' valid positions, one after another): no per-row
    Python objects or slices on the writer's path.
    """

    def __init__(self, name: str, set_name: str):
        self.name, self.set = name, set_name
        self.columns: dict[str, list] = {}  # row_id, split, text, ..., length, input_ids
        self.logits: list[np.ndarray] = []  # (B, num_labels) per batch
        self.cls: list[np.ndarray] = []  # (B, n_layers * d) per batch
        self.packed: dict[str, list[np.ndarray]] = {}  # Zarr array name (ZARR_ARRAYS) -> per-batch blocks

    @property
    def num_rows(self) -> int:
        return len(self.columns.get("row_id", ()))

    def add_batch(self, columns: dict[str, list], out: dict[str, np.ndarray]) -> None:
        """One teacher batch: its row columns and outputs (logits, cls, and packed Zarr arrays)."""
        for key, column in columns.items():
            self.columns.setdefault(key, []).extend(column)
        self.logits.append(out["logits"])
        if "cls" in out:
            self.cls.append(out["cls"].reshape(len(out["logits"]), -1))
        for name in ZARR_ARRAYS:
            if name in out:
                self.packed.setdefault(name, []).append(out[name])


def _arrow_table(buf: ShardBuffer, layout: FieldLayout, num_labels: int) -> pa.Table:
    lengths = np.asarray(buf.columns["length"], np.int64)
    tok_off = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    att_off = np.concatenate([[0], np.cumsum(lengths**2)[:-1]])
    cls_width = buf.cls[0].shape[1] if layout.cls_layers else 0
    schema = row_columns(num_labels, cls_width)
    cols = {}
    for f in schema:
        if f.name == "tok_offset":
            cols[f.name] = pa.array(tok_off, pa.int64())
        elif f.name == "att_offset":
            cols[f.name] = pa.array(att_off, pa.int64())
        elif f.name in ("logits", "cls"):
            flat = np.concatenate(getattr(buf, f.name)).astype(
                np.float32 if f.name == "logits" else np.float16, copy=False).reshape(-1)
            cols[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), f.type.list_size)
        else:
            cols[f.name] = pa.array(buf.columns[f.name], f.type)
    return pa.Table.from_pydict(cols, schema=schema)


def _arrow_bytes(table: pa.Table) -> pa.Buffer:
    """The shard's Arrow IPC file in one buffer of its exact size (sized by a dry run, so it never regrows)."""
    def write(sink) -> None:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=1024)

    size = pa.MockOutputStream()
    write(size)
    out = pa.allocate_buffer(size.size())
    write(pa.FixedSizeBufferWriter(out))
    return out


def _write_zarr(buf: ShardBuffer, files: ShardFiles, folder: str, layout: FieldLayout) -> None:
    """The shard's Zarr group, encoded in memory one array at a time and handed to `files` (the same files a
    Zarr LocalStore would write: one per key). A lost chunk reads as the fill value: NaN, or INT8_MISSING."""
    import zarr
    from zarr.storage import MemoryStore

    encoded: dict = {}
    group = zarr.open_group(MemoryStore(encoded), mode="w")
    for name in (n for n in ZARR_ARRAYS if n in buf.packed):
        with files.profile.step("encode"):
            data = np.concatenate(buf.packed[name])  # each array is joined only when its turn comes
        per_position = int(np.prod(data.shape[1:])) * data.itemsize
        with files.profile.step("compress"):
            arr = group.create_array(name, shape=data.shape, dtype=data.dtype,
                                     fill_value=INT8_MISSING if data.dtype == np.int8 else np.nan,
                                     chunks=(chunk_positions(per_position, len(data)), *data.shape[1:]),
                                     compressors=zarr_codecs(layout.zarr_codec),
                                     config={"write_empty_chunks": True})  # no per-chunk comparison with the fill
            arr[...] = data
        del data
        for key in [k for k in encoded if k != "zarr.json"]:  # this array goes to disk before the next is built
            files.write(f"{folder}/{key}", encoded.pop(key).as_numpy_array())
    files.write(f"{folder}/zarr.json", encoded.pop("zarr.json").as_numpy_array())  # rewritten with each array


class CacheWriter:
    """Commits shards into a cache folder.

    The commit point of a shard is its record `shards/<name>.json` (its ShardInfo), written
    atomically after both data files are in place. The manifest is the merged list of
    records; `merge_records` brings it up to date (after each shard in a single process,
    under the cache lock at the end of each rank's work in a multi-rank run).
    """

    def __init__(self, cache_dir: Path, manifest: Manifest):
        self.dir = Path(cache_dir)
        self.manifest = manifest
        self.set_order: list[str] = []  # this run's sets, in run order (see merge_records)
        self.profile = WriteProfile()  # where the commits' time went (run summary, bench/writer.py)
        (self.dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def records(self) -> dict[str, ShardInfo]:
        out = {}
        for p in sorted((self.dir / SHARD_DIR).glob("*.json")):
            try:
                out[p.stem] = ShardInfo(**json.loads(p.read_text()))
            except (json.JSONDecodeError, TypeError) as e:
                raise UserError(f"{p}: damaged shard record ({e}); delete it and its shard files, then re-run") from None
        return out

    def merge_records(self) -> int:
        """List every committed shard in the manifest, in a canonical order: set, then index.

        Sets keep the order they first entered the manifest (`set_order` declares this run's
        sets up front), so the order does not depend on which shard finished first, on how
        many ranks or commit threads wrote them, or on where an interrupted run stopped.
        """
        for name in self.set_order:
            self.manifest.sets.setdefault(name, {"rows": 0})
        listed = {s.name for s in self.manifest.shards}
        new = [r for name, r in self.records().items() if name not in listed]
        for info in new:
            self.manifest.shards.append(info)
            entry = self.manifest.sets.setdefault(info.set, {"rows": 0})
            entry["rows"] = entry.get("rows", 0) + info.rows
        if new:
            rank = {name: i for i, name in enumerate(self.manifest.sets)}
            self.manifest.shards.sort(key=lambda s: (rank[s.set], s.name))
            self.manifest.save(self.dir)
            # checksummed from their final files when committed: verified as of now
            stamp = Stamp(self.dir)
            stamp.shards.update({r.name: stat_digest(self.dir, r.name) for r in new})
            stamp.save(self.manifest)
        return len(new)

    def repair(self) -> list[tuple[ShardInfo, str]]:
        """Check every committed shard (under the cache lock); un-commit the damaged ones.

        File sizes and mtimes are compared with the stamp on every run; checksums are
        recomputed only for shards whose files changed since they were last verified.
        A damaged shard loses its record, files and manifest entry, so its rows are
        planned again and the teacher reruns for them only. Returns (shard, problem) pairs.
        """
        self.manifest = Manifest.load(self.dir)
        self.merge_records()
        stamp, damaged = Stamp(self.dir), []
        for info in self.manifest.shards:
            problem = stamp.check(info)
            if problem:
                damaged.append((info, problem))
        for info, _ in damaged:
            record_path(self.dir, info.name).unlink(missing_ok=True)  # un-committed first
            self.manifest.shards.remove(info)
            self.manifest.sets[info.set]["rows"] -= info.rows
        if damaged:
            self.manifest.save(self.dir)
            self.remove_unfinished({info.name for info, _ in damaged})
        stamp.save(self.manifest)
        return damaged

    def remove_unfinished(self, shards: set[str]) -> list[str]:
        """Delete files of the given shards that have no record (left by an interrupted run)."""
        recorded = set(self.records())
        removed = []
        for p in sorted((self.dir / SHARD_DIR).iterdir()):
            stem = p.name.split(".")[0]
            if stem in shards and (stem not in recorded or p.name.endswith(TMP_SUFFIX)):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p.name)
        return removed

    def commit(self, buf: ShardBuffer, merge: bool = True) -> ShardInfo:
        """Write both files under temporary names (checksummed from memory), make them durable, rename them,
        write the record, then merge."""
        info = self.seal(self.write_files(buf))
        if merge:
            self.merge_records()
        return info

    def write_files(self, buf: ShardBuffer) -> "WrittenShard":
        """A shard's files under temporary names, handed to the OS (their checksums still being taken): the
        CPU half of a commit, which the next shard may start while this one is sealed."""
        layout = self.manifest.layout
        shards = arrow_path(self.dir, buf.name).parent
        written = WrittenShard(buf.name, buf.set, buf.num_rows, int(sum(buf.columns["length"])),
                               ShardFiles(shards, self.profile), bool(buf.packed))
        try:
            with self.profile.step("encode"):
                data = _arrow_bytes(_arrow_table(buf, layout, len(self.manifest.label_names)))
            written.files.write(written.tmp_arrow, data)
            del data
            crash_point("shard-arrow-written")
            if written.has_zarr:
                shutil.rmtree(shards / written.tmp_zarr, ignore_errors=True)
                _write_zarr(buf, written.files, written.tmp_zarr, layout)
        except BaseException:
            written.discard()
            raise
        return written

    def seal(self, written: "WrittenShard") -> ShardInfo:
        """The disk half of a commit: fsync, rename into place, then the record (the commit point)."""
        shards = written.files.root
        try:
            written.files.flush()
        except BaseException:
            written.discard()
            raise
        arrow_sum = written.files.digests[Path(written.tmp_arrow)]
        zarr_sum = tree_digest(written.files.digests_under(written.tmp_zarr)) if written.has_zarr else None
        if written.has_zarr:
            crash_point("shard-zarr-written")
            atomic_replace_dir(shards / written.tmp_zarr, zarr_path(self.dir, written.name))
        crash_point("shard-zarr-renamed")
        (shards / written.tmp_arrow).replace(arrow_path(self.dir, written.name))
        fsync_dir(shards)
        crash_point("shard-files-in-place")
        info = ShardInfo(name=written.name, set=written.set, rows=written.rows, tokens=written.tokens,
                         arrow_sha256=arrow_sum, zarr_sha256=zarr_sum)
        with self.profile.step("record"):
            atomic_write_text(record_path(self.dir, written.name), json.dumps(asdict(info)))
        crash_point("shard-recorded")
        return info


@dataclass
class WrittenShard:
    """A shard whose files are written under temporary names but not yet durable, renamed or recorded."""

    name: str
    set: str
    rows: int
    tokens: int
    files: ShardFiles
    has_zarr: bool

    @property
    def tmp_arrow(self) -> str:
        return arrow_path(Path("."), self.name).name + TMP_SUFFIX

    @property
    def tmp_zarr(self) -> str:
        return zarr_path(Path("."), self.name).name + TMP_SUFFIX

    def discard(self) -> None:
        """A failed shard (disk full, an error) removes its files, freeing their space for the manifest merge."""
        (self.files.root / self.tmp_arrow).unlink(missing_ok=True)
        shutil.rmtree(self.files.root / self.tmp_zarr, ignore_errors=True)
