"""Read a teacher cache: memory-mapped Arrow for row fields, whole Zarr slices for ragged ones.

Importable without torch or transformers (stage two never loads a teacher). Fields a
caller does not ask for are never opened: a logits-only reader touches no Zarr array.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from data.io import UserError, atomic_write_text, sha256_file, sha256_files, sha256_tree
from pipeline.cache_schema import (ALL_FIELDS, INT8_MISSING, STAMP, TOKENIZER_DIR, ZARR_FIELDS, FieldLayout,
                                   Manifest, ShardInfo, arrow_path, tokenizer_files, zarr_path)
from pipeline.quantize import dequantize

ROW_FIELDS = ("row_id", "set", "split", "source_id", "method", "text", "text_b", "label", "length", "truncated")


@dataclass
class Columns:
    """Rows of a shard as arrays: `lengths` (teacher tokens) and `labels` (-100: none) per row; `rows`: one entry
    per row (logits (n, K) fp32, cls (n, layers, d) fp16); `ragged`: (flat positions, each row's first position)
    for input_ids (len per row), hidden and values (len), attention (len², layers, H)."""

    n: int
    lengths: np.ndarray
    labels: np.ndarray
    rows: dict[str, np.ndarray]
    ragged: dict[str, tuple[np.ndarray, np.ndarray]]


class ShardReader:
    """One shard: `read(start, stop, fields)` returns a dict of column values for rows [start, stop)."""

    def __init__(self, cache_dir: Path, info: ShardInfo, layout: FieldLayout):
        self.info, self.layout, self.cache_dir = info, layout, Path(cache_dir)
        self._zarr = None
        self._plain: dict[str, PlainChunks | None] = {}

    @cached_property
    def table(self) -> pa.Table:
        path = arrow_path(self.cache_dir, self.info.name)
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"shard {self.info.name} ({path}): unreadable Arrow file ({e}); "
                            "the cache is damaged: delete the shard and re-run `make teacher-cache`") from None
        if table.num_rows != self.info.rows:
            raise UserError(f"shard {self.info.name}: {table.num_rows} rows on disk, manifest says {self.info.rows}")
        return table

    def __len__(self) -> int:
        return self.info.rows

    def _array(self, name: str):
        if self._zarr is None:
            import zarr

            path = zarr_path(self.cache_dir, self.info.name)
            try:
                self._zarr = zarr.open_group(str(path), mode="r")
            except Exception as e:
                raise UserError(f"shard {self.info.name} ({path}): unreadable Zarr group ({e})") from None
        try:
            return self._zarr[name]
        except KeyError:
            raise UserError(f"shard {self.info.name}: Zarr array {name!r} missing") from None

    def _column(self, name: str, start: int, stop: int):
        return self.table.column(name).slice(start, stop - start)

    def columns(self, start: int, stop: int, fields=("logits",)) -> "Columns":
        """Rows [start, stop) as whole arrays, no per-row objects: what the training stream slices batches from."""
        stop = min(stop, self.info.rows)
        n = stop - start
        lengths = self._column("length", start, stop).to_numpy().astype(np.int64)
        labels = self._column("label", start, stop).fill_null(-100).to_numpy().astype(np.int64)
        out = Columns(n, lengths, labels, {}, {})
        if "logits" in fields:
            out.rows["logits"] = _fixed_list_numpy(self._column("logits", start, stop), np.float32, (n,))
        if "cls" in fields:
            d = len(self.layout.cls_layers)
            out.rows["cls"] = _fixed_list_numpy(self._column("cls", start, stop), np.float16, (n, d))
        if "input_ids" in fields:
            col = self._column("input_ids", start, stop).combine_chunks()
            offsets = col.offsets.to_numpy()
            out.ragged["input_ids"] = (col.flatten().to_numpy(zero_copy_only=False).astype(np.int64),
                                       (offsets[:-1] - offsets[0]).astype(np.int64))
        for name in ("hidden", "values", "attention"):
            if name in fields:
                out.ragged[name] = self._ragged(name, start, stop, lengths)
        return out

    def _ragged(self, name: str, start: int, stop: int, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions of the rows as fp16, each row's first position in it) of a Zarr field."""
        per_row = lengths * lengths if name == "attention" else lengths
        offsets = self._column("att_offset" if name == "attention" else "tok_offset", start, stop).to_numpy()
        lo, hi = (int(offsets[0]), int(offsets[-1] + per_row[-1])) if len(offsets) else (0, 0)
        block = self._checked(name, lo, hi)
        if self.layout.quantize == "int8":  # float16 = int8 × scale (pipeline/quantize.py)
            if name == "attention":  # one scale per row, layer and head: repeated over the row's positions
                scales = np.repeat(self._checked("attention_scale", start, stop), per_row, axis=0)
            else:  # one scale per token vector
                scales = self._checked(f"{name}_scale", lo, hi)[..., None]
            block = dequantize(block, scales)
        return block, (offsets - lo).astype(np.int64)

    def read(self, start: int, stop: int, fields=("logits",)) -> dict:
        """Rows [start, stop) of this shard as per-row values (row fields as lists, token fields one array per
        row, attention as (layers, H, len, len)): for lookups and inspection; training slices `columns`."""
        stop = min(stop, self.info.rows)
        out = {name: self._column(name, start, stop).to_pylist() for name in ROW_FIELDS}
        cols = self.columns(start, stop, fields)
        out.update({k: np.array(v) for k, v in cols.rows.items()})  # writable copies, not views of the mapped file
        sizes = {"input_ids": cols.lengths, "hidden": cols.lengths, "values": cols.lengths,
                 "attention": cols.lengths * cols.lengths}
        for name, (flat, starts) in cols.ragged.items():
            rows = [flat[a : a + size] for a, size in zip(starts.tolist(), sizes[name].tolist())]
            if name == "attention":  # (L², layers, H) -> (layers, H, L, L)
                rows = [r.reshape(L, L, *r.shape[1:]).transpose(2, 3, 0, 1) for r, L in zip(rows, cols.lengths.tolist())]
            out[name] = rows
        return out

    def _checked(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Positions [lo, hi) of a Zarr array. Uncompressed arrays (the default) are read straight from their chunk
        files, where a lost chunk is a missing or short file; through Zarr a lost chunk reads as the fill value
        (NaN, or -128 for int8)."""
        if name not in self._plain:
            self._plain[name] = PlainChunks.of(zarr_path(self.cache_dir, self.info.name) / name)
        plain = self._plain[name]
        block = plain.read(lo, hi) if plain is not None else self._array(name)[lo:hi]
        if block is None or (plain is None and _has_missing(block)):
            raise UserError(f"shard {self.info.name}: {name} has missing data (a Zarr chunk deleted or damaged)")
        return block


@dataclass(frozen=True)
class PlainChunks:
    """A Zarr v3 array whose chunks are raw little-endian C-order bytes cut along the position axis only (what
    cache.zarr_codec=none writes): positions [lo, hi) are read from the chunk files into one array, one copy from
    the page cache, instead of through Zarr's codec pipeline and a NaN scan (about 2.5x the rows/s here)."""

    folder: Path
    per_chunk: int  # positions per chunk
    row_shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, folder: Path) -> "PlainChunks | None":
        """The array's chunk layout when it is plain; None (read through Zarr) for any other codec or grid."""
        try:
            meta = json.loads((folder / "zarr.json").read_text())
        except (OSError, ValueError):
            return None  # Zarr reports a missing or unreadable array by name
        shape, grid = meta.get("shape", []), meta.get("chunk_grid", {})
        chunks = grid.get("configuration", {}).get("chunk_shape", [])
        plain = (meta.get("zarr_format") == 3 and grid.get("name") == "regular" and len(chunks) == len(shape) > 0
                 and chunks[1:] == shape[1:] and not meta.get("storage_transformers")
                 and meta.get("codecs") == [{"name": "bytes", "configuration": {"endian": "little"}}]
                 and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
                 and meta.get("data_type") in ("float16", "float32", "int8"))
        return cls(folder, chunks[0], tuple(shape[1:]), np.dtype(meta["data_type"])) if plain else None

    def read(self, lo: int, hi: int) -> np.ndarray | None:
        """Positions [lo, hi); None when a chunk file is missing or shorter than its chunk."""
        out = np.empty((hi - lo, *self.row_shape), self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        row = out.itemsize * math.prod(self.row_shape)
        at = 0
        for k in range(lo // self.per_chunk, (hi - 1) // self.per_chunk + 1) if hi > lo else ():
            first, last = max(lo, k * self.per_chunk), min(hi, (k + 1) * self.per_chunk)
            want = (last - first) * row
            try:
                with open(self.folder.joinpath("c", str(k), *["0"] * len(self.row_shape)), "rb", buffering=0) as f:
                    f.seek((first - k * self.per_chunk) * row)
                    got = 0
                    while got < want:
                        n = f.readinto(view[at + got : at + want])
                        if not n:
                            return None
                        got += n
            except FileNotFoundError:
                return None
            at += want
        return out


def _has_missing(block: np.ndarray) -> bool:
    """Any fill value in the block: NaN (fp16 tested on its bits, numpy's isnan is slow on fp16), or INT8_MISSING."""
    if block.dtype == np.float16:
        return bool(((block.view(np.uint16) & 0x7FFF) > 0x7C00).any())  # exponent all ones, mantissa not zero
    return bool(np.isnan(block).any() if block.dtype.kind == "f" else (block == INT8_MISSING).any())


def _fixed_list_numpy(col: pa.ChunkedArray, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column's values as a `shape` + (the rest of each row,) array (a view of the memory-mapped
    file when it is one chunk); no rows give an empty array of the same row shape."""
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks]
    flat = chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False).reshape(*shape, col.type.list_size // math.prod(shape[1:]))


def stat_digest(cache_dir: Path, shard: str) -> str | None:
    """Digest of a shard's file names, sizes and mtimes (None: its Arrow file is gone).

    Equal to the digest stamped when the shard was last checksummed = unchanged since,
    so an untouched cache is not rehashed on every run.
    """
    files = [arrow_path(cache_dir, shard), *sorted(p for p in zarr_path(cache_dir, shard).rglob("*") if p.is_file())]
    h = hashlib.sha256()
    for p in files:
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        h.update(f"{p.relative_to(cache_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class Stamp:
    """verified.json: each shard's stat digest when its checksums last matched. The writer, `verify` and a pull
    all check against it, so a cache is checksummed once, not on every read; a changed size or mtime means
    checksumming again. A lost update (two processes stamping at once) only costs one more checksum."""

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir)
        try:
            self.shards = dict(json.loads((self.dir / STAMP).read_text())["shards"])
        except (FileNotFoundError, KeyError, TypeError, ValueError):
            self.shards = {}  # no or a damaged stamp only means every shard is checksummed once more
        self._saved = dict(self.shards)

    def check(self, info: ShardInfo, zarr: bool = True, full: bool = False) -> str | None:
        """What is wrong with the shard's files, or None; unchanged since verified = None without reading them."""
        digest = stat_digest(self.dir, info.name)
        if digest is not None and self.shards.get(info.name) == digest and not full:
            return None
        problem = shard_problem(self.dir, info, zarr)
        if problem is None and (zarr or not info.zarr_sha256):  # every file was checksummed
            self.shards[info.name] = digest
        return problem

    def save(self, manifest: Manifest) -> None:
        """Write the stamp if it changed (shards no longer listed are dropped); a read-only cache keeps none."""
        listed = {s.name for s in manifest.shards}
        kept = {k: v for k, v in sorted(self.shards.items()) if k in listed and v}
        if kept == self._saved:
            return
        try:
            atomic_write_text(self.dir / STAMP, json.dumps({"shards": kept}, indent=0))
            self._saved = kept
        except PermissionError:
            pass


def shard_problem(cache_dir: Path, info: ShardInfo, zarr: bool = True) -> str | None:
    """What is wrong with a committed shard's files (missing, checksum mismatch), or None."""
    path = arrow_path(cache_dir, info.name)
    if not path.is_file():
        return f"file {path} missing"
    if sha256_file(path) != info.arrow_sha256:
        return f"Arrow checksum mismatch ({path} changed or damaged)"
    if info.zarr_sha256 and zarr:
        zpath = zarr_path(cache_dir, info.name)
        if not zpath.is_dir() or sha256_tree(zpath) != info.zarr_sha256:
            return f"Zarr checksum mismatch ({zpath} changed, damaged or missing)"
    return None


class TeacherCache:
    """A cache folder: manifest, shard readers, checks, random access by row id."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.manifest = Manifest.load(self.dir)
        self._readers: dict[str, ShardReader] = {}
        self._logits: dict[str, np.ndarray] = {}

    @property
    def layout(self) -> FieldLayout:
        return self.manifest.layout

    @property
    def label_names(self) -> list[str]:
        return self.manifest.label_names

    @property
    def num_labels(self) -> int:
        return len(self.manifest.label_names)

    @cached_property
    def tokenizer_dir(self) -> Path | None:
        """The teacher's tokenizer folder: the cache's own copy (checked against the manifest's checksum), else,
        for a cache built before caches carried one, the teacher folder the manifest names when it is on this
        machine with the same files; None when neither is."""
        own = self.dir / TOKENIZER_DIR
        for folder in (own, Path(self.manifest.teacher.path)):
            files = tokenizer_files(folder) if folder.is_dir() else []
            if files and sha256_files(files) == self.manifest.teacher.tokenizer_sha256:
                return folder
            if folder == own and own.exists():
                raise UserError(f"cache {self.dir}: {TOKENIZER_DIR}/ does not match the manifest's tokenizer checksum "
                                "(changed or damaged); copy the teacher's tokenizer files into it again")
        return None

    def check_fields(self, fields) -> None:
        """Refuse before training when a loss needs a field this cache does not hold."""
        unknown = set(fields) - set(ALL_FIELDS)
        if unknown:
            raise UserError(f"unknown cache field(s) {sorted(unknown)}; known: {list(ALL_FIELDS)}")
        missing = set(fields) - self.layout.stored()
        if missing:
            raise UserError(f"cache {self.dir} has no {sorted(missing)} (stored: {sorted(self.layout.stored())}); "
                            f"rebuild it with the matching cache.*_layers setting")

    def shards(self, sets=None) -> list[ShardInfo]:
        chosen = [s for s in self.manifest.shards if sets is None or s.set in sets]
        if sets is not None and not chosen:
            raise UserError(f"cache {self.dir} has no rows of set(s) {sorted(sets)}; sets: {sorted(self.manifest.sets)}")
        return chosen

    def sets(self) -> list[str]:
        return sorted(self.manifest.sets)

    def reader(self, shard: ShardInfo | str) -> ShardReader:
        name = shard if isinstance(shard, str) else shard.name
        if name not in self._readers:
            info = next((s for s in self.manifest.shards if s.name == name), None)
            if info is None:
                raise UserError(f"cache {self.dir}: no shard {name!r}")
            self._readers[name] = ShardReader(self.dir, info, self.layout)
        return self._readers[name]

    def verify(self, sets=None, fields=ALL_FIELDS, full: bool = False) -> int:
        """Checksums of the shards whose files changed since they were last verified (every shard with `full`);
        a damaged shard raises with its name. Returns the number of shards found whole."""
        stamp, shards = Stamp(self.dir), self.shards(sets)
        try:
            for s in shards:
                problem = stamp.check(s, zarr=bool(set(fields) & set(ZARR_FIELDS)), full=full)
                if problem:
                    raise UserError(f"shard {s.name}: {problem}")
        finally:
            stamp.save(self.manifest)
        return len(shards)

    def row_table(self, sets=None, columns=ROW_FIELDS) -> pa.Table:
        """Row-level columns of the chosen sets (for vocabularies, evaluation, joins)."""
        tables = [self.reader(s).table.select(list(columns)) for s in self.shards(sets)]
        return pa.concat_tables(tables)

    @cached_property
    def _index(self) -> dict[str, tuple[str, int]]:
        index = {}
        for s in self.manifest.shards:
            for i, rid in enumerate(self.reader(s).table.column("row_id").to_pylist()):
                index[rid] = (s.name, i)
        return index

    def __contains__(self, row_id: str) -> bool:
        return row_id in self._index

    def __len__(self) -> int:
        return sum(s.rows for s in self.manifest.shards)

    def logits_of(self, row_ids) -> np.ndarray:
        """(rows, K) logits of these row ids, joined by id (Dynamic KD's second teacher): a shard's logits column
        is converted once and gathered from, never row by row."""
        out = np.empty((len(row_ids), self.num_labels), np.float32)
        missing = next((r for r in row_ids if r not in self._index), None)
        if missing is not None:
            raise KeyError(f"row {missing} not in cache {self.dir}")
        shards = np.array([self._index[r][0] for r in row_ids])
        positions = np.array([self._index[r][1] for r in row_ids], np.int64)
        for shard in np.unique(shards).tolist():
            if shard not in self._logits:
                r = self.reader(shard)
                self._logits[shard] = _fixed_list_numpy(r.table.column("logits"), np.float32, (r.info.rows,))
            chosen = shards == shard
            out[chosen] = self._logits[shard][positions[chosen]]
        return out

    def lookup(self, row_id: str, fields=("logits",)) -> dict:
        """One row by id, as a dict of single values: random access for joins by row id (Dynamic KD's second
        teacher, per training row); a stream of rows reads whole windows with reader() instead."""
        if row_id not in self._index:
            raise KeyError(f"row {row_id} not in cache {self.dir}")
        shard, i = self._index[row_id]
        block = self.reader(shard).read(i, i + 1, fields)
        return {k: v[0] for k, v in block.items()}
