"""Write cache shards: buffer one shard's rows, then commit Arrow + Zarr atomically.

A shard is written under temporary names, fsynced, renamed into place, and only then
listed in the manifest (also replaced atomically). Anything on disk that the manifest
does not list is an unfinished shard from an interrupted run and is removed on resume.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from data.io import atomic_replace_dir, fsync_dir, sha256_file, sha256_tree
from pipeline.cache_schema import (SHARD_DIR, FieldLayout, Manifest, ShardInfo, arrow_path, chunk_positions,
                                   row_columns, zarr_path)

TMP_SUFFIX = ".partial"


def _codec(name: str):
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return [ZstdCodec(level=1)]
    if name == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    if name == "none":
        return None
    raise ValueError(f"unknown zarr_codec {name!r}: zstd, blosc-lz4 or none")


class ShardBuffer:
    """Rows of one shard as they come out of the teacher, in per-row numpy arrays."""

    def __init__(self, name: str, set_name: str):
        self.name, self.set = name, set_name
        self.rows: list[dict] = []
        self.hidden: list[np.ndarray] = []  # (len, n_layers, d)
        self.attention: list[np.ndarray] = []  # (len², n_layers, H)
        self.values: list[np.ndarray] = []  # (len, d)

    def add(self, row: dict, hidden=None, attention=None, values=None) -> None:
        self.rows.append(row)
        if hidden is not None:
            self.hidden.append(hidden)
        if attention is not None:
            self.attention.append(attention)
        if values is not None:
            self.values.append(values)


def _arrow_table(buf: ShardBuffer, layout: FieldLayout, num_labels: int) -> pa.Table:
    rows = buf.rows
    lengths = np.array([r["length"] for r in rows], np.int64)
    tok_off = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(rows) else lengths
    att_off = np.concatenate([[0], np.cumsum(lengths**2)[:-1]]) if len(rows) else lengths
    cls_width = len(rows[0]["cls"]) if layout.cls_layers else 0
    schema = row_columns(num_labels, cls_width)
    cols = {}
    for f in schema:
        if f.name == "tok_offset":
            cols[f.name] = pa.array(tok_off, pa.int64())
        elif f.name == "att_offset":
            cols[f.name] = pa.array(att_off, pa.int64())
        elif f.name in ("logits", "cls"):
            flat = np.concatenate([np.asarray(r[f.name]) for r in rows]).astype(
                np.float32 if f.name == "logits" else np.float16)
            cols[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), f.type.list_size)
        else:
            cols[f.name] = pa.array([r[f.name] for r in rows], f.type)
    return pa.Table.from_pydict(cols, schema=schema)


def _write_arrow(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=1024)
        sink.flush()
    with open(path, "rb+") as f:
        import os

        os.fsync(f.fileno())


def _write_zarr(buf: ShardBuffer, path: Path, codec: str) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w")
    for name, parts in (("hidden", buf.hidden), ("attention", buf.attention), ("values", buf.values)):
        if not parts:
            continue
        data = np.concatenate(parts).astype(np.float16, copy=False)
        per_position = int(np.prod(data.shape[1:])) * data.itemsize
        arr = group.create_array(name, shape=data.shape, dtype="float16", fill_value=np.nan,
                                 chunks=(chunk_positions(per_position), *data.shape[1:]),
                                 compressors=_codec(codec))
        arr[...] = data


class CacheWriter:
    """Commits shards into a cache folder and keeps its manifest current."""

    def __init__(self, cache_dir: Path, manifest: Manifest):
        self.dir = Path(cache_dir)
        self.manifest = manifest
        (self.dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def remove_unlisted(self) -> list[str]:
        """Delete shard files the manifest does not list (left by an interrupted run)."""
        listed = {s.name for s in self.manifest.shards}
        removed = []
        for p in sorted((self.dir / SHARD_DIR).iterdir()):
            stem = p.name.split(".")[0]
            if stem not in listed or p.name.endswith(TMP_SUFFIX):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p.name)
        return removed

    def commit(self, buf: ShardBuffer) -> ShardInfo:
        """Write both files under temporary names, rename, then list the shard in the manifest."""
        layout = self.manifest.layout
        final_arrow, final_zarr = arrow_path(self.dir, buf.name), zarr_path(self.dir, buf.name)
        tmp_arrow = final_arrow.with_name(final_arrow.name + TMP_SUFFIX)
        tmp_zarr = final_zarr.with_name(final_zarr.name + TMP_SUFFIX)
        table = _arrow_table(buf, layout, len(self.manifest.label_names))
        _write_arrow(table, tmp_arrow)
        has_zarr = bool(buf.hidden or buf.attention or buf.values)
        if has_zarr:
            shutil.rmtree(tmp_zarr, ignore_errors=True)
            _write_zarr(buf, tmp_zarr, layout.zarr_codec)
            zarr_sum = sha256_tree(tmp_zarr)
            atomic_replace_dir(tmp_zarr, final_zarr)
        tmp_arrow.replace(final_arrow)
        fsync_dir(final_arrow.parent)
        info = ShardInfo(name=buf.name, set=buf.set, rows=len(buf.rows),
                         tokens=int(sum(r["length"] for r in buf.rows)),
                         arrow_sha256=sha256_file(final_arrow), zarr_sha256=zarr_sum if has_zarr else None)
        self.manifest.shards.append(info)
        entry = self.manifest.sets.setdefault(buf.set, {"rows": 0})
        entry["rows"] = entry.get("rows", 0) + info.rows
        self.manifest.save(self.dir)
        return info
