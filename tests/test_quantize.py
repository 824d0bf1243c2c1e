"""cache.quantize=int8: the same rows as the fp16 cache within half a quantisation step, half the bytes, a format
version readers check, and a lost chunk still caught."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data.io import UserError
from pipeline.cache_reader import TeacherCache
from pipeline.cache_schema import MANIFEST, QUANTIZED_VERSION, SCHEMA_VERSION, Manifest
from pipeline.quantize import dequantize, quantize
from pipeline.teacher_cache import build_cache
from tests.conftest import tiny_run_config

FIELDS = ("logits", "cls", "hidden", "attention", "values")


@pytest.fixture(scope="module")
def int8_cache(tiny_workdir, tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    run = tiny_run_config(tiny_workdir, **{"cache.root": str(root), "cache.quantize": "int8"})
    return Path(build_cache(run)["cache"])


def _zarr_bytes(cache: TeacherCache, sets) -> int:
    return sum(p.stat().st_size for s in cache.shards(sets)
               for p in (cache.dir / "shards" / f"{s.name}.zarr").rglob("*") if p.is_file())


def test_int8_cache_reads_the_fp16_rows_within_half_a_step(tiny_cache, int8_cache):
    fp16, int8 = TeacherCache(tiny_cache[1]), TeacherCache(int8_cache)
    assert int8.manifest.schema_version == QUANTIZED_VERSION and int8.verify() == len(int8.manifest.shards)
    sets = ["train", "dev", "test"]  # other tests add augmented rows to the session's fp16 cache
    assert {s.name: s.rows for s in int8.shards(sets)} == {s.name: s.rows for s in fp16.shards(sets)}
    for shard in fp16.shards(["dev"]):
        a, b = fp16.reader(shard).read(0, shard.rows, FIELDS), int8.reader(shard.name).read(0, shard.rows, FIELDS)
        assert a["row_id"] == b["row_id"]
        np.testing.assert_array_equal(a["logits"], b["logits"])
        np.testing.assert_array_equal(a["cls"], b["cls"])
        for name in ("hidden", "values", "attention"):
            for x, y in zip(a[name], b[name]):
                assert x.shape == y.shape and y.dtype == np.float16
                x32, err = x.astype(np.float32), np.abs(x.astype(np.float32) - y.astype(np.float32))
                # one step per token vector (last axis), or per row block of each layer and head (attention)
                step = (np.abs(x32).max(axis=(-2, -1), keepdims=True) if name == "attention"
                        else np.abs(x32).max(axis=-1, keepdims=True)) / 127
                assert (err <= 0.5 * step * 1.01 + 1e-3 * np.abs(x32) + 1e-6).all(), name
    assert _zarr_bytes(int8, sets) < 0.6 * _zarr_bytes(fp16, sets)


def test_fp16_manifest_stays_version_1(tiny_cache):
    d = json.loads((tiny_cache[1] / MANIFEST).read_text())
    assert d["schema_version"] == SCHEMA_VERSION == 1 and "quantize" not in d["layout"]


def test_lost_int8_chunk_is_caught(int8_cache, tmp_path):
    import shutil

    cache_dir = tmp_path / "copy"
    shutil.copytree(int8_cache, cache_dir)
    info = Manifest.load(cache_dir).shards[0]
    chunk = next(p for p in (cache_dir / "shards" / f"{info.name}.zarr" / "hidden").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    with pytest.raises(UserError, match=f"shard {info.name}: hidden has missing data"):
        TeacherCache(cache_dir).reader(info).read(0, info.rows, ("hidden",))


def test_bad_quantize_setting_is_one_line(tiny_workdir, tmp_path):
    run = tiny_run_config(tiny_workdir, **{"cache.root": str(tmp_path), "cache.quantize": "int4"})
    with pytest.raises(UserError, match="cache.quantize: 'int4' is not one of none, int8"):
        build_cache(run)
    assert not any(tmp_path.iterdir())


def test_quantize_round_trip_and_zero_vectors():
    import torch

    x = torch.randn(300, 2, 16) * torch.rand(300, 2, 1) * 10
    x[3] = 0
    q, scale = quantize(x, x.abs().amax(dim=-1, keepdim=True))
    assert q.dtype == torch.int8 and int(q.min()) >= -127 and scale.dtype == torch.float16
    back = dequantize(q.numpy(), scale.numpy()).astype(np.float32)
    assert (back[3] == 0).all()
    step = x.abs().amax(dim=-1, keepdim=True).numpy() / 127
    assert (np.abs(back - x.numpy()) <= 0.5 * step * 1.01 + 1e-3 * np.abs(x.numpy()) + 1e-6).all()


def test_fp16_cache_keeps_the_run_key_it_had_before_quantize(tiny_cache, monkeypatch):
    """Runs trained before caches could be quantised must still find their key: an fp16 cache's fingerprint
    material has no quantize entry (as its manifest has none)."""
    from trainer import run_key

    seen = []
    monkeypatch.setattr(run_key, "_digest", lambda material: seen.append(material) or "digest")
    run_key.cache_fingerprint(TeacherCache(tiny_cache[1]))
    assert "quantize" not in seen[0]["layout"] and "cls_layers" in seen[0]["layout"]
