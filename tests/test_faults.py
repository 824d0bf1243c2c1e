"""Crash harness (bench/faults.py) on a few kill points: nothing lost, duplicated or changed."""
from __future__ import annotations

import random


from bench.faults import cache_trials, student_trials


def test_kill_inside_commit_points_then_resume(tiny_cache, tmp_path):
    run, reference = tiny_cache
    base = ["pipeline.teacher_cache", f"data.out_dir={run.data.out_dir}", f"data.max_rows={run.data.max_rows}",
            f"teacher.out_dir={run.teacher.out_dir}", "teacher.max_length=48", "cache.shard_rows=64",
            "cache.batch_size=32", "cache.name=c", "cache.splits=train,dev,test",
            f"cache.augment_dir={tmp_path / 'none'}"]
    results = cache_trials(base, reference, tmp_path, trials=3, rng=random.Random(2),
                           sets=("train", "dev", "test"))
    assert [r["point"] for r in results] == ["shard-arrow-written", "shard-zarr-written", "shard-zarr-renamed"]
    assert all(r["kills"] >= 1 for r in results)
    assert all(r["lost"] == r["extra"] == r["duplicated"] == r["values_differ"] == 0 for r in results)


def test_killed_student_resumes_to_identical_weights(tiny_cache, tmp_path):
    _, cache_dir = tiny_cache
    results = student_trials(cache_dir, tmp_path, trials=1, rng=random.Random(0))
    assert results[0]["killed"] and results[0]["identical_weights"]
