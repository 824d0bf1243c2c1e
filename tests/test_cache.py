"""The cache contract: round trip against a fresh teacher forward, resume, refusals, damage."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.io import UserError
from data.rows import ROW_SCHEMA, make_row_id, write_rows
from pipeline.attention_capture import AttentionCapture
from pipeline.cache_reader import TeacherCache
from pipeline.cache_schema import MANIFEST, Manifest
from pipeline.teacher import load_classifier
from pipeline.teacher_cache import build_cache
from tests.conftest import REPO, tiny_run_config

ALL = ("logits", "cls", "hidden", "attention", "values", "input_ids")


def test_round_trip_equals_fresh_forward(tiny_cache):
    run, cache_dir = tiny_cache
    cache = TeacherCache(cache_dir)
    assert cache.verify() == len(cache.manifest.shards)
    lay = cache.layout
    assert lay.attention_layers == [1] and lay.hidden_layers == [0, 1] and lay.values_layer == 1
    model, _ = load_classifier(run.teacher.out_dir, cache.num_labels)
    model.eval()
    block = cache.reader(cache.shards(["dev"])[0]).read(0, 64, ALL)
    lengths = block["length"]
    assert len(set(lengths)) > 5  # ragged rows
    for i in [0, len(lengths) // 2, len(lengths) - 1]:
        ids = torch.tensor(block["input_ids"][i])[None]
        with torch.inference_mode(), AttentionCapture(model, layers=[1], values_layer=1) as cap:
            out = model(input_ids=ids, output_hidden_states=True)
        L = lengths[i]
        np.testing.assert_allclose(block["logits"][i], out.logits[0].numpy(), atol=1e-4)
        for j, layer in enumerate(lay.hidden_layers):
            ref = out.hidden_states[layer][0].numpy()
            np.testing.assert_allclose(block["hidden"][i][:, j].astype(np.float32), ref, atol=2e-2, rtol=2e-3)
            np.testing.assert_allclose(block["cls"][i][j].astype(np.float32), ref[0], atol=2e-2, rtol=2e-3)
        assert block["attention"][i].shape == (1, 12, L, L)
        np.testing.assert_allclose(block["attention"][i][0].astype(np.float32), cap.scores[1][0].numpy(),
                                   atol=3e-2, rtol=2e-3)
        np.testing.assert_allclose(block["values"][i].astype(np.float32), cap.values[0].numpy(), atol=2e-2, rtol=2e-3)


def test_logits_only_read_opens_no_zarr(tiny_cache):
    _, cache_dir = tiny_cache
    reader = TeacherCache(cache_dir).reader(TeacherCache(cache_dir).shards(["train"])[0])
    reader.read(0, 10, ("logits", "cls"))
    assert reader._zarr is None


def test_lookup_by_row_id(tiny_cache):
    _, cache_dir = tiny_cache
    cache = TeacherCache(cache_dir)
    table = cache.row_table(["test"])
    rid = table.column("row_id")[5].as_py()
    row = cache.lookup(rid, ("logits",))
    assert row["row_id"] == rid and row["logits"].shape == (3,)


def augmented_rows(source: str, texts: list[str], method: str = "tang") -> pa.Table:
    """Unlabelled rows as augment.run writes them, sources <source>1, <source>2, ..."""
    n = len(texts)
    return pa.Table.from_pydict({
        "row_id": [make_row_id(source, t) for t in texts], "text": texts, "text_b": [None] * n, "label": [None] * n,
        "split": ["train"] * n, "source_id": [f"{source}{i + 1}" for i in range(n)], "method": [method] * n,
        "provenance": [json.dumps({"seed": 1})] * n}, schema=ROW_SCHEMA)


def test_union_of_augment_methods_is_not_cached_again(tiny_cache, tmp_path):
    """augment.run's union.parquet repeats its methods' rows: by default the cache takes each method's set only."""
    from pipeline.teacher_cache import gather_sets

    run, _ = tiny_cache
    tang, tiny = augmented_rows("t", ["one row"]), augmented_rows("b", ["two row"], "tinybert")
    for name, table in (("tang", tang), ("tinybert", tiny), ("union", pa.concat_tables([tang, tiny]))):
        write_rows(table, tmp_path / f"{name}.parquet")

    def sets(**extra):
        cfg = tiny_run_config(Path(run.data.out_dir).parent, **{"cache.augment_dir": str(tmp_path), **extra})
        return [name for name, _ in gather_sets(cfg, Path(run.data.out_dir)) if name.startswith("aug-")]

    assert sets() == ["aug-tang", "aug-tinybert"]
    assert sets(**{"cache.augment_sets": "[union]"}) == ["aug-union"]


def test_rerun_adds_only_new_augmented_rows(tiny_workdir, tiny_cache):
    run, cache_dir = tiny_cache
    before = TeacherCache(cache_dir)
    n_before = len(before)
    aug = augmented_rows("src", ["this is a brand new augmented [MASK] row", "another unseen sentence about cars"])
    write_rows(aug, Path(run.cache.augment_dir) / "tang.parquet")
    summary = build_cache(run)
    assert summary["rows_written"] == 2
    assert summary["sets"]["train"]["already_cached"] == summary["sets"]["train"]["cached_now"]
    after = TeacherCache(cache_dir)
    assert len(after) == n_before + 2
    rows = after.row_table(["aug-tang"])
    assert rows.column("label").null_count == 2 and sorted(rows.column("source_id").to_pylist()) == ["src1", "src2"]
    assert build_cache(run)["rows_written"] == 0  # a third run has nothing left to do
    shutil.rmtree(run.cache.augment_dir)


def test_extension_keeps_the_cache_codec_and_reports_where_time_went(tiny_cache, tmp_path):
    """A run with another zarr_codec extends a cache (each array names its codec; the cache keeps its own), and
    the summary's write profile counts exactly the bytes that reached the disk."""
    import zarr

    run, cache_dir = tiny_cache
    shutil.copytree(cache_dir, tmp_path / "cache" / cache_dir.name)
    write_rows(augmented_rows("n", ["a row no shard holds yet", "and a second new one"]),
               tmp_path / "augment" / "extra.parquet")
    other = tiny_run_config(Path(run.data.out_dir).parent, **{
        "cache.root": str(tmp_path / "cache"), "cache.augment_dir": str(tmp_path / "augment"),
        "cache.zarr_codec": "zstd"})
    summary = build_cache(other)
    assert summary["rows_written"] == 2 and summary["teacher_busy_s"] > 0 and summary["writer_wait_s"] >= 0
    cache = TeacherCache(tmp_path / "cache" / cache_dir.name)
    assert cache.verify() == len(cache.manifest.shards)  # checksums taken from memory match the files
    (new,) = cache.shards(["aug-extra"])
    group = zarr.open_group(str(cache.dir / "shards" / f"{new.name}.zarr"), mode="r")
    assert cache.layout.zarr_codec == "none" and list(group["hidden"].compressors) == []  # the cache's own codec
    files = [cache.dir / "shards" / f"{new.name}.arrow",
             *(p for p in (cache.dir / "shards" / f"{new.name}.zarr").rglob("*") if p.is_file())]
    assert summary["write_profile"]["bytes"] == sum(p.stat().st_size for p in files)


def test_mismatched_cache_is_refused(tiny_cache):
    run, _ = tiny_cache
    other = tiny_run_config(Path(run.data.out_dir).parent, **{"teacher.max_length": 32})
    with pytest.raises(UserError, match="different max_length"):
        build_cache(other)
    other = tiny_run_config(Path(run.data.out_dir).parent, **{"cache.attention_layers": "none"})
    with pytest.raises(UserError, match="different stored layers"):
        build_cache(other)


def test_schema_version_refused(tiny_cache, tmp_path):
    _, cache_dir = tiny_cache
    d = json.loads((cache_dir / MANIFEST).read_text())
    d["schema_version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(UserError, match="schema version 99"):
        TeacherCache(tmp_path)


def _copy_cache(cache_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(cache_dir, dst)
    return dst


def test_flipped_byte_detected(tiny_cache, tmp_path):
    cache_dir = _copy_cache(tiny_cache[1], tmp_path)
    shard = Manifest.load(cache_dir).shards[0].name
    path = cache_dir / "shards" / f"{shard}.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"shard {shard}: Arrow checksum mismatch"):
        TeacherCache(cache_dir).verify()


def test_deleted_zarr_chunk_detected_on_read(tiny_cache, tmp_path):
    cache_dir = _copy_cache(tiny_cache[1], tmp_path)
    info = Manifest.load(cache_dir).shards[0]
    chunk = next(p for p in (cache_dir / "shards" / f"{info.name}.zarr" / "hidden").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    chunk.unlink()
    cache = TeacherCache(cache_dir)
    with pytest.raises(UserError, match="Zarr checksum mismatch"):
        cache.verify()
    with pytest.raises(UserError, match=f"shard {info.name}: hidden has missing data"):
        cache.reader(info).read(0, info.rows, ("hidden",))


def test_truncated_arrow_detected(tiny_cache, tmp_path):
    cache_dir = _copy_cache(tiny_cache[1], tmp_path)
    info = Manifest.load(cache_dir).shards[1]
    path = cache_dir / "shards" / f"{info.name}.arrow"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"shard {info.name}"):
        TeacherCache(cache_dir).reader(info).table


def _cache_rows(cache_dir: Path, sets=("train", "dev", "test")) -> dict:
    cache = TeacherCache(cache_dir)
    rows = {}
    for s in cache.shards(sets):
        b = cache.reader(s).read(0, s.rows, ("logits", "attention"))
        for rid, logits, att in zip(b["row_id"], b["logits"], b["attention"]):
            assert rid not in rows, f"duplicated row {rid}"
            rows[rid] = (logits, att)
    return rows


def test_killed_writer_resumes_without_loss_or_duplicates(tiny_cache, tmp_path):
    run, reference = tiny_cache
    args = [sys.executable, "-m", "pipeline.teacher_cache", f"data.out_dir={run.data.out_dir}",
            f"data.max_rows={run.data.max_rows}", f"teacher.out_dir={run.teacher.out_dir}", "teacher.max_length=48",
            "cache.shard_rows=16", "cache.batch_size=8", f"cache.root={tmp_path}", "cache.name=resumed",
            f"cache.augment_dir={tmp_path / 'none'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    manifest = tmp_path / "resumed" / MANIFEST
    for kill_after_shards in (2, 9):
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if manifest.is_file() and len(Manifest.load(manifest.parent).shards) >= kill_after_shards:
                time.sleep(0.05 * kill_after_shards)  # land somewhere inside the next shard
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got, want = _cache_rows(tmp_path / "resumed"), _cache_rows(reference)
    assert set(got) == set(want)
    for rid, (logits, att) in want.items():
        np.testing.assert_allclose(got[rid][0], logits, atol=1e-5)
        np.testing.assert_array_equal(got[rid][1], att)
    names = [s.name for s in Manifest.load(tmp_path / "resumed").shards]
    for set_name in ("train", "dev", "test"):  # each set's shards numbered 0..n-1, none twice
        numbers = [int(n.rsplit("-", 1)[1]) for n in names if n.rsplit("-", 1)[0] == set_name]
        assert numbers == list(range(len(numbers)))


def test_progress_bar_says_writer_bound_when_the_teacher_waits(tiny_cache):
    from tqdm import tqdm

    from pipeline.cache_writer import CacheWriter
    from pipeline.teacher_cache import Pace

    _, cache_dir = tiny_cache
    with tqdm(disable=False, file=open(os.devnull, "w")) as bar:
        pace = Pace(CacheWriter(cache_dir, Manifest.load(cache_dir)), bar)
        pace.shard_done(shard_s=1.0, waited_s=0.5)
        assert bar.postfix.startswith("writer-bound, ") and bar.postfix.endswith(" MB/s written")
        pace.shard_done(shard_s=1.0, waited_s=0.01)
        assert not bar.postfix
    assert pace.summary()["writer_wait_s"] == 0.51


def test_an_empty_range_reads_every_field_empty(tiny_cache):
    """read/columns over no rows give every asked field, empty, as they give it for rows (no special cases)."""
    _, cache_dir = tiny_cache
    cache = TeacherCache(cache_dir)
    info = cache.shards(["dev"])[0]
    empty, full = cache.reader(info).read(3, 3, ALL), cache.reader(info).read(3, 5, ALL)
    assert set(empty) == set(full) and all(len(v) == 0 for v in empty.values())
    cols = cache.reader(info).columns(3, 3, ALL)
    assert cols.n == 0 and set(cols.rows) | set(cols.ragged) == set(ALL)
    for name, (flat, starts) in cols.ragged.items():
        assert len(flat) == len(starts) == 0 and flat.shape[1:] == cache.reader(info).columns(3, 5, ALL).ragged[name][0].shape[1:]


def test_plain_chunk_files_read_as_zarr_reads_them(tiny_cache, tmp_path):
    """Uncompressed arrays (the default) are read straight from their chunk files: every Zarr field equals Zarr's
    own read over ranges at, inside and across chunk boundaries; a compressed array is read through Zarr; a short
    chunk file is missing data."""
    import zarr

    from pipeline.cache_reader import PlainChunks
    from pipeline.cache_writer import zarr_codecs

    cache_dir = _copy_cache(tiny_cache[1], tmp_path)
    info = Manifest.load(cache_dir).shards[0]
    folder = cache_dir / "shards" / f"{info.name}.zarr"
    group = zarr.open_group(str(folder), mode="r+")

    def rewrite(name: str, codec: str):  # the same values in 7-position chunks, so ranges cross boundaries
        data = group[name][:]
        group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(7, *data.shape[1:]),
                           compressors=zarr_codecs(codec), fill_value=np.nan, overwrite=True)[...] = data
        return data

    for name in ("hidden", "attention", "values"):
        whole = rewrite(name, "none")
        assert PlainChunks.of(folder / name).per_chunk == 7
        n = len(whole)
        for lo, hi in [(0, n), (0, 1), (6, 8), (7, 14), (3, 40), (n - 1, n), (5, 5)]:
            got = TeacherCache(cache_dir).reader(info)._checked(name, lo, hi)
            assert got.dtype == whole.dtype and got.flags.writeable
            np.testing.assert_array_equal(got, whole[lo:hi])
    data = rewrite("hidden", "zstd")
    assert PlainChunks.of(folder / "hidden") is None
    np.testing.assert_array_equal(TeacherCache(cache_dir).reader(info)._checked("hidden", 0, len(data)), data)
    chunk = next(p for p in (folder / "values").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(UserError, match=f"shard {info.name}: values has missing data"):
        TeacherCache(cache_dir).reader(info).read(0, info.rows, ("values",))
