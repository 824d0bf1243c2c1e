"""Disk full during a shard write: exit code 3, one line, and the cache as it was before."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.cache_reader import TeacherCache
from tests.conftest import REPO, tmpfs


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small", "size=6m") as mnt:
        yield mnt


def test_disk_full_keeps_previous_state(tiny_cache, small_disk):
    run, _ = tiny_cache
    args = [sys.executable, "-m", "pipeline.teacher_cache", f"data.out_dir={run.data.out_dir}",
            f"data.max_rows={run.data.max_rows}", f"teacher.out_dir={run.teacher.out_dir}", "teacher.max_length=48",
            "cache.shard_rows=16", "cache.batch_size=16", f"cache.root={small_disk}", "cache.name=c",
            f"cache.augment_dir={small_disk / 'none'}"]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: disk full") and "previous state is intact" in last
    cache = TeacherCache(small_disk / "c")
    assert len(cache.manifest.shards) > 0  # some shards committed before the disk filled
    assert cache.verify() == len(cache.manifest.shards)  # and every listed shard is whole
    for s in cache.shards():
        assert cache.reader(s).read(0, s.rows, ("logits", "hidden"))["row_id"]
