"""Shared fixtures: a tiny real corpus, a 1-layer MiniLM teacher fine-tuned on it, its cache.

Everything is real (the shipped MiniLM cut to one layer, the shipped tweet corpus, real
Arrow/Zarr shards); only the sizes are small so the suite runs in minutes on 2 cores.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from data.config import load_config  # noqa: E402
from pipeline.run_config import RunConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (a small or read-only disk for the disk-full and permission tests);
    the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def tiny_run_config(tmp: Path, **overrides) -> RunConfig:
    """A RunConfig for tiny tests: 1-layer teacher, 300 tweets, small shards."""
    items = {
        "data.source": "tweets", "data.max_rows": 300, "data.out_dir": str(tmp / "data"),
        "teacher.num_layers": 1, "teacher.epochs": 1, "teacher.max_length": 48,
        "teacher.out_dir": str(tmp / "teacher"), "teacher.lr": 1e-4,
        "cache.root": str(tmp / "cache"), "cache.shard_rows": 64, "cache.batch_size": 32,
        "cache.augment_dir": str(tmp / "augment"),
    }
    items.update(overrides)
    return load_config(RunConfig, None, [f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_cache(tiny_workdir):
    """(RunConfig, cache dir) of a cache over train/dev/test of the tiny corpus."""
    from pipeline.teacher_cache import build_cache

    run = tiny_run_config(tiny_workdir)
    summary = build_cache(run)
    return run, Path(summary["cache"])


@pytest.fixture(scope="session")
def student_cache(tmp_path_factory):
    """A better teacher for training tests: MiniLM cut to 2 layers, 1,200 tweets, 3 epochs (~0.65 dev)."""
    from pipeline.teacher_cache import build_cache

    tmp = tmp_path_factory.mktemp("students")
    run = tiny_run_config(tmp, **{"data.max_rows": 1200, "teacher.num_layers": 2, "teacher.epochs": 3,
                                  "teacher.lr": 3e-4, "teacher.batch_size": 16, "cache.shard_rows": 256,
                                  "cache.batch_size": 64})
    summary = build_cache(run)
    return run, Path(summary["cache"])
