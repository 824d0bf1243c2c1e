"""Caches on fsspec URLs: push (manifest last), pull (verified), resume, damage, open_cache, cache.push_to."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from fsspec.core import url_to_fs
from fsspec.implementations.memory import MemoryFileSystem

from data.io import UserError
from pipeline.cache_reader import TeacherCache
from pipeline.cache_schema import MANIFEST
from pipeline.cache_sync import main as sync_main
from pipeline.cache_sync import open_cache, pull, push, push_built

ALL = ("logits", "cls", "hidden", "attention", "values", "input_ids")


@pytest.fixture(autouse=True)
def clean_memory():
    MemoryFileSystem.store.clear()
    yield
    MemoryFileSystem.store.clear()


@pytest.fixture
def puts(monkeypatch):
    """Files written to the memory filesystem (put_file and pipe_file), by path."""
    seen: list[str] = []

    def counting(name: str, target: int):
        orig = getattr(MemoryFileSystem, name)

        def wrapper(self, *args, **kw):
            seen.append(args[target])
            return orig(self, *args, **kw)
        return wrapper

    monkeypatch.setattr(MemoryFileSystem, "put_file", counting("put_file", 1))  # (local, remote)
    monkeypatch.setattr(MemoryFileSystem, "pipe_file", counting("pipe_file", 0))  # (remote, data)
    return seen


def _url() -> str:
    return f"memory://sync-{uuid.uuid4().hex[:8]}/minilm"


def assert_same_cache(a: Path, b: Path) -> None:
    """Same manifest and, shard by shard, every row of every stored field."""
    assert (Path(a) / MANIFEST).read_bytes() == (Path(b) / MANIFEST).read_bytes()
    ca, cb = TeacherCache(a), TeacherCache(b)
    fields = [f for f in ALL if f in ca.layout.stored()]
    assert {"hidden", "attention", "values"} <= set(fields)
    for s in ca.manifest.shards:
        ra, rb = ca.reader(s).read(0, s.rows, fields), cb.reader(s).read(0, s.rows, fields)
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], np.ndarray):
                np.testing.assert_array_equal(ra[k], rb[k])
            elif ra[k] and isinstance(ra[k][0], np.ndarray):
                assert all(np.array_equal(x, y, equal_nan=True) for x, y in zip(ra[k], rb[k], strict=True)), (s.name, k)
            else:
                assert ra[k] == rb[k], (s.name, k)


def test_push_pull_round_trip_memory(tiny_cache, tmp_path, puts):
    _, cache_dir = tiny_cache
    url = _url()
    first = push(cache_dir, url)
    n_shards = len(TeacherCache(cache_dir).manifest.shards)
    assert first["shards"] == n_shards and first["manifest"] and len(puts) == first["files"] + 1
    assert puts[-1].endswith(MANIFEST)  # the commit point goes last
    assert not any(p.endswith((".tmp", ".partial", ".lock", "plan.arrow")) for p in puts)
    got = pull(url, tmp_path / "mirror")
    assert got == {"shards": n_shards, "bytes": got["bytes"], "kept": 0} and got["bytes"] > 0
    assert_same_cache(cache_dir, tmp_path / "mirror")
    assert TeacherCache(tmp_path / "mirror").verify() == n_shards
    puts.clear()
    again = push(cache_dir, url)  # idempotent: nothing to upload
    assert puts == [] and again == {"shards": 0, "files": 0, "bytes": 0, "manifest": False}
    assert pull(url, tmp_path / "mirror") == {"shards": 0, "bytes": 0, "kept": n_shards}


def test_file_url_and_cli(tiny_cache, tmp_path, capsys):
    _, cache_dir = tiny_cache
    url = f"file://{tmp_path}/remote/minilm"
    assert sync_main(["push", str(cache_dir), url]) == 0 and "pushed" in capsys.readouterr().out
    assert not list((tmp_path / "remote").rglob("*.tmp"))
    assert open_cache(url).dir == tmp_path / "remote/minilm"  # file:// opens in place
    pull(url, tmp_path / "mirror")
    assert_same_cache(cache_dir, tmp_path / "mirror")


def test_interrupted_push_resumes(tiny_cache, tmp_path, puts, monkeypatch):
    _, cache_dir = tiny_cache
    url = _url()
    fs, root = url_to_fs(url)
    shards = [s.name for s in TeacherCache(cache_dir).manifest.shards]
    orig = MemoryFileSystem.put_file

    def dying(self, lpath, rpath, *a, **kw):  # the connection drops in the middle of the second shard
        if shards[1] in rpath and ".zarr/" in rpath:
            raise OSError("connection reset")
        return orig(self, lpath, rpath, *a, **kw)

    monkeypatch.setattr(MemoryFileSystem, "put_file", dying)
    with pytest.raises(OSError, match="connection reset"):
        push(cache_dir, url)
    monkeypatch.setattr(MemoryFileSystem, "put_file", orig)
    assert not fs.exists(f"{root}/{MANIFEST}")  # not committed: a reader sees no cache
    with pytest.raises(UserError, match="no manifest.json"):
        pull(url, tmp_path / "early")
    puts.clear()
    done = push(cache_dir, url)  # resumes: the first shard is not sent again
    assert done["shards"] == len(shards) - 1 and done["manifest"] and len(puts) == done["files"] + 1
    assert not any(f"/{shards[0]}." in p for p in puts)
    # a remote that lost its manifest and one shard file: the next push restores exactly those
    shard = TeacherCache(cache_dir).manifest.shards[1].name
    chunk = sorted(fs.find(f"{root}/shards/{shard}.zarr"))[-1]
    fs.rm_file(chunk)
    fs.rm_file(f"{root}/{MANIFEST}")
    puts.clear()
    push(cache_dir, url)
    assert puts == [chunk, f"{root}/{MANIFEST}"]
    pull(url, tmp_path / "mirror")
    assert_same_cache(cache_dir, tmp_path / "mirror")


@pytest.mark.parametrize("which", ["arrow", "zarr"])
def test_damaged_remote_shard_refused(tiny_cache, tmp_path, which):
    _, cache_dir = tiny_cache
    url = _url()
    push(cache_dir, url)
    fs, root = url_to_fs(url)
    shard = TeacherCache(cache_dir).manifest.shards[0].name
    path = (f"{root}/shards/{shard}.arrow" if which == "arrow"
            else sorted(fs.find(f"{root}/shards/{shard}.zarr"))[-1])
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(UserError, match=f"shard {shard}: .* in {url} does not match") as e:
        pull(url, tmp_path / "mirror")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "mirror" / MANIFEST).exists()  # nothing made visible
    assert not list((tmp_path / "mirror/shards").glob(f"{shard}.*"))


def test_open_cache_url_and_trainer_config(tiny_cache, tmp_path, monkeypatch):
    from trainer.run_setup import local_caches
    from trainer.train import TrainConfig

    _, cache_dir = tiny_cache
    monkeypatch.setenv("DISTIL_CACHE_HOME", str(tmp_path / "home"))
    url = _url()
    push(cache_dir, url)
    cache = open_cache(url)
    assert cache.dir.parent == tmp_path / "home" and cache.verify() == len(cache.manifest.shards)
    rid = TeacherCache(cache_dir).row_table(["dev"], ["row_id"]).column("row_id")[0].as_py()
    np.testing.assert_array_equal(cache.lookup(rid)["logits"], TeacherCache(cache_dir).lookup(rid)["logits"])
    cfg = local_caches(TrainConfig(cache=url, cache2=str(cache_dir)))
    assert cfg.cache == str(cache.dir) and cfg.cache2 == str(cache_dir)


def test_build_cache_push_to(tiny_cache, tmp_path, capsys):
    from pipeline.teacher_cache import build_cache
    from tests.conftest import tiny_run_config

    run, cache_dir = tiny_cache
    copy = tmp_path / "cache" / cache_dir.name  # a copy: nothing left to compute, then the push
    shutil.copytree(cache_dir, copy)
    url = _url()
    push_built(url, copy, pending=True)
    assert not url_to_fs(url)[0].exists(url_to_fs(url)[1]) and "not pushing" in capsys.readouterr().out
    over = {"data.out_dir": run.data.out_dir, "teacher.out_dir": run.teacher.out_dir,
            "cache.root": str(tmp_path / "cache"), "cache.augment_dir": run.cache.augment_dir, "cache.push_to": url}
    summary = build_cache(tiny_run_config(tmp_path, **over))
    assert summary["rows_written"] == 0 and f"to {url}" in capsys.readouterr().out
    pull(url, tmp_path / "mirror")
    assert_same_cache(copy, tmp_path / "mirror")
    with pytest.raises(UserError, match="nope://"):
        build_cache(tiny_run_config(tmp_path, **{**over, "cache.push_to": "nope://x"}))
