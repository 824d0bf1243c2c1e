"""torchrun: a cache written by 2 ranks equals one written by 1; ranks resume alone; DDP students."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cache_reader import TeacherCache
from pipeline.cache_schema import Manifest
from tests.conftest import REPO

SETS = ("train", "dev", "test")


def _cache_args(run, root, name):
    return [f"data.out_dir={run.data.out_dir}", f"data.max_rows={run.data.max_rows}",
            f"teacher.out_dir={run.teacher.out_dir}", "teacher.max_length=48", "cache.shard_rows=64",
            "cache.batch_size=32", f"cache.root={root}", f"cache.name={name}", f"cache.augment_dir={root}/none"]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def assert_same_cache(got_dir, want_dir):
    """Same shards, same row ids in each, same values (fp tolerance: ranks may use other thread counts)."""
    got, want = TeacherCache(got_dir), TeacherCache(want_dir)
    g = {s.name: s for s in got.shards(SETS)}
    w = {s.name: s for s in want.shards(SETS)}
    assert sorted(g) == sorted(w)
    for name in w:
        a = got.reader(name).read(0, w[name].rows, ("logits", "attention", "hidden"))
        b = want.reader(name).read(0, w[name].rows, ("logits", "attention", "hidden"))
        assert a["row_id"] == b["row_id"]
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)
        for x, y in zip(a["attention"] + a["hidden"], b["attention"] + b["hidden"]):
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-2, rtol=1e-2)
    assert len(got) - sum(s.rows for s in got.shards() if s.set not in SETS) == sum(s.rows for s in w.values())


def test_two_ranks_equal_one(tiny_cache, tmp_path):
    run, reference = tiny_cache
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m",
                        "pipeline.teacher_cache", *_cache_args(run, tmp_path, "two")], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "two" / "plan.arrow").exists()
    assert_same_cache(tmp_path / "two", reference)


def test_a_dead_rank_resumes_alone(tiny_cache, tmp_path):
    run, reference = tiny_cache
    base = [sys.executable, "-m", "pipeline.teacher_cache", *_cache_args(run, tmp_path, "alone"),
            "cache.world_size=2"]
    # rank 1 dies inside its second shard commit (after the files, before the record) ...
    r = subprocess.run(base + ["cache.rank=1"], cwd=REPO, env=_env(DISTIL_CRASH_AT="shard-files-in-place:2"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9
    r0 = subprocess.run(base + ["cache.rank=0"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r0.returncode == 0, r0.stderr[-3000:]
    assert "other ranks still have shards to write" in r0.stdout
    # ... and is restarted alone: it removes its half-written shard and completes the cache
    r1 = subprocess.run(base + ["cache.rank=1"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert "removed" in r1.stdout
    assert len(Manifest.load(tmp_path / "alone").shards) == len(TeacherCache(reference).shards(SETS))
    assert_same_cache(tmp_path / "alone", reference)


@pytest.mark.parametrize("student", ["bilstm"])
def test_ddp_student_under_torchrun(tiny_cache, tmp_path, student):
    _, cache_dir = tiny_cache
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "trainer.train",
                        f"cache={cache_dir}", f"students={student}", "losses=hinton", "epochs=2",
                        f"out_dir={tmp_path}", "measure_latency=false", "train_sets=train"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"| {student}-hinton |") == 1  # only rank 0 prints the table
    assert (tmp_path / f"{student}-hinton" / "best" / "model.safetensors").is_file()
    epochs = [line for line in (tmp_path / f"{student}-hinton" / "metrics.jsonl").read_text().splitlines()
              if "dev_accuracy" in line]
    assert len(epochs) == 2
