"""Read a teacher cache: memory-mapped Arrow for row fields, whole Zarr slices for ragged ones.

Importable without torch or transformers (stage two never loads a teacher). Fields a
caller does not ask for are never opened: a logits-only reader touches no Zarr array.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa

from data.io import UserError, sha256_file, sha256_tree
from pipeline.cache_schema import (ALL_FIELDS, INT8_MISSING, ZARR_FIELDS, FieldLayout, Manifest, ShardInfo,
                                   arrow_path, zarr_path)
from pipeline.quantize import dequantize

ROW_FIELDS = ("row_id", "set", "split", "source_id", "method", "text", "text_b", "label", "length", "truncated")


class ShardReader:
    """One shard: `read(start, stop, fields)` returns a dict of column values for rows [start, stop)."""

    def __init__(self, cache_dir: Path, info: ShardInfo, layout: FieldLayout):
        self.info, self.layout, self.cache_dir = info, layout, Path(cache_dir)
        self._zarr = None

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

    def read(self, start: int, stop: int, fields=("logits",)) -> dict:
        """Rows [start, stop) of this shard: row fields always, plus the asked-for groups."""
        stop = min(stop, self.info.rows)
        out = {name: self._column(name, start, stop).to_pylist() for name in ROW_FIELDS}
        n = stop - start
        if "logits" in fields:
            out["logits"] = _fixed_list_numpy(self._column("logits", start, stop), np.float32).reshape(n, -1)
        if "cls" in fields:
            d = len(self.layout.cls_layers)
            out["cls"] = _fixed_list_numpy(self._column("cls", start, stop), np.float16).reshape(n, d, -1)
        if "input_ids" in fields:
            out["input_ids"] = _list_numpy(self._column("input_ids", start, stop), np.int64) if n > 0 else []
        lengths = out["length"]
        for name, offsets_col, per_row in (("hidden", "tok_offset", lambda L: L), ("values", "tok_offset", lambda L: L),
                                           ("attention", "att_offset", lambda L: L * L)):
            if name not in fields:
                continue
            offsets = self._column(offsets_col, start, stop).to_numpy()
            lo, hi = int(offsets[0]), int(offsets[-1]) + per_row(lengths[-1])
            block = self._checked(name, lo, hi)
            rows = [block[o - lo : o - lo + per_row(L)] for o, L in zip(offsets.tolist(), lengths)]
            if self.layout.quantize == "int8":  # float16 = int8 × scale (pipeline/quantize.py)
                if name == "attention":  # one scale per row, layer and head
                    scales = self._checked("attention_scale", start, stop)
                    rows = [dequantize(r, s) for r, s in zip(rows, scales)]
                else:  # one scale per token vector
                    scales = self._checked(f"{name}_scale", lo, hi)
                    rows = [dequantize(r, scales[o - lo : o - lo + L, ..., None])
                            for r, o, L in zip(rows, offsets.tolist(), lengths)]
            if name == "attention":  # (L², layers, H) -> (layers, H, L, L)
                rows = [r.reshape(L, L, *r.shape[1:]).transpose(2, 3, 0, 1) for r, L in zip(rows, lengths)]
            out[name] = rows
        return out

    def _checked(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Positions [lo, hi) of a Zarr array; a lost chunk reads as the fill value (NaN, or -128 for int8)."""
        block = self._array(name)[lo:hi]
        if np.isnan(block).any() if block.dtype.kind == "f" else (block == INT8_MISSING).any():
            raise UserError(f"shard {self.info.name}: {name} has missing data (a Zarr chunk deleted or damaged)")
        return block


def _list_numpy(col: pa.ChunkedArray, dtype) -> list[np.ndarray]:
    """A list<...> column as one array per row (views into one converted buffer, no Python ints)."""
    col = col.combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    offsets = col.offsets.to_numpy()
    return np.split(flat, offsets[1:-1] - offsets[0])


def _fixed_list_numpy(col: pa.ChunkedArray, dtype) -> np.ndarray:
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks]
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)


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

    @property
    def layout(self) -> FieldLayout:
        return self.manifest.layout

    @property
    def label_names(self) -> list[str]:
        return self.manifest.label_names

    @property
    def num_labels(self) -> int:
        return len(self.manifest.label_names)

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

    def verify(self, sets=None, fields=ALL_FIELDS) -> int:
        """Recompute checksums; a damaged shard raises with its name. Returns shards checked."""
        shards = self.shards(sets)
        for s in shards:
            problem = shard_problem(self.dir, s, zarr=bool(set(fields) & set(ZARR_FIELDS)))
            if problem:
                raise UserError(f"shard {s.name}: {problem}")
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

    def lookup(self, row_id: str, fields=("logits",)) -> dict:
        """One row by id, as a dict of single values: random access for joins by row id (Dynamic KD's second
        teacher, per training row); a stream of rows reads whole windows with reader() instead."""
        if row_id not in self._index:
            raise KeyError(f"row {row_id} not in cache {self.dir}")
        shard, i = self._index[row_id]
        block = self.reader(shard).read(i, i + 1, fields)
        return {k: v[0] for k, v in block.items()}
