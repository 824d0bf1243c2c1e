"""Stage one against a hostile user: concurrent runs, damaged caches, bad settings, signals.

Each case ends in one line (exit 2, 3, 130 or 143) or in a repaired cache, never in a
traceback or a silently wrong cache (issue 11).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.io import UserError, run_cli
from pipeline import cache_reader
from pipeline.cache_plan import run_lock
from pipeline.cache_reader import TeacherCache
from pipeline.cache_schema import MANIFEST, STAMP, Manifest
from pipeline.teacher_cache import build_cache
from tests.conftest import REPO, tiny_run_config, tmpfs


def _copy(cache_dir: Path, dst: Path) -> Path:
    """A private copy of the session cache; copy2 keeps mtimes, so the copy's stamp still holds."""
    shutil.copytree(cache_dir, dst)
    return dst


def _run_on(tiny_workdir: Path, cache_dir: Path, **overrides):
    """The session's data and teacher, caching into `cache_dir`."""
    return tiny_run_config(tiny_workdir, **{"cache.root": str(cache_dir.parent), "cache.name": cache_dir.name,
                                            **overrides})


def _cli(run, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.teacher_cache", f"data.out_dir={run.data.out_dir}",
            f"data.max_rows={run.data.max_rows}", f"teacher.out_dir={run.teacher.out_dir}", "teacher.max_length=48",
            f"cache.root={run.cache.root}", f"cache.name={run.cache.name}",
            f"cache.augment_dir={run.cache.augment_dir}", f"cache.shard_rows={run.cache.shard_rows}", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _manifest_shards(cache_dir: Path) -> dict:
    return {s.name: (s.rows, s.arrow_sha256, s.zarr_sha256) for s in Manifest.load(cache_dir).shards}


def test_second_run_refused_while_the_first_holds_the_cache(tiny_workdir, tiny_cache, tmp_path):
    cache_dir = _copy(tiny_cache[1], tmp_path / "busy")
    before = _manifest_shards(cache_dir)
    with run_lock(cache_dir, shared=False):  # the first run, in this process; the second, with other settings
        r = subprocess.run(_cli(_run_on(tiny_workdir, cache_dir), "cache.batch_size=7"), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cache_dir) in lines[0] and f"pid {os.getpid()}" in lines[0], r.stderr
    assert _manifest_shards(cache_dir) == before


def test_torchrun_rank_refused_while_a_single_run_holds_the_cache(tiny_workdir, tiny_cache, tmp_path):
    cache_dir = _copy(tiny_cache[1], tmp_path / "busy")
    rank = _run_on(tiny_workdir, cache_dir, **{"cache.world_size": 2, "cache.rank": 0})
    with run_lock(cache_dir, shared=False), pytest.raises(UserError, match=f"pid {os.getpid()}"):
        build_cache(rank)  # flock conflicts between open files of one process too


def test_rerun_repairs_damaged_truncated_and_deleted_shards(tiny_workdir, tiny_cache, tmp_path, capsys):
    reference = tiny_cache[1]
    cache_dir = _copy(reference, tmp_path / "damaged")
    want = _manifest_shards(reference)
    shards = [s for s in Manifest.load(cache_dir).shards if s.set in ("train", "dev", "test")]
    flipped, truncated, deleted, chunkless = shards[0], shards[1], shards[-1], shards[-2]
    path = cache_dir / "shards" / f"{flipped.name}.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    path = cache_dir / "shards" / f"{truncated.name}.arrow"
    path.write_bytes(path.read_bytes()[:1000])
    (cache_dir / "shards" / f"{deleted.name}.arrow").unlink()
    zarr_dir = cache_dir / "shards" / f"{chunkless.name}.zarr" / "hidden"
    next(p for p in zarr_dir.rglob("*") if p.is_file() and p.name != "zarr.json").unlink()

    summary = build_cache(_run_on(tiny_workdir, cache_dir))
    out = capsys.readouterr().out
    repaired = [line for line in out.splitlines() if line.startswith("repairing shard")]
    assert len(repaired) == 4, out
    for info, why in ((flipped, "Arrow checksum mismatch"), (truncated, "Arrow checksum mismatch"),
                      (deleted, "missing"), (chunkless, "Zarr checksum mismatch")):
        assert any(line.startswith(f"repairing shard {info.name}: ") and why in line for line in repaired), out
    assert summary["rows_written"] == sum(s.rows for s in (flipped, truncated, deleted, chunkless))
    assert TeacherCache(cache_dir).verify() == len(want)
    assert _manifest_shards(cache_dir) == want  # same shards, same rows, byte-identical files


def test_untouched_cache_is_not_rehashed(tiny_workdir, tiny_cache, tmp_path, monkeypatch):
    cache_dir = _copy(tiny_cache[1], tmp_path / "clean")
    (cache_dir / STAMP).unlink()  # as left by an older version: every shard is checksummed once
    checked = []
    real = cache_reader.shard_problem
    monkeypatch.setattr(cache_reader, "shard_problem", lambda *a, **k: checked.append(a[1].name) or real(*a, **k))
    run = _run_on(tiny_workdir, cache_dir)
    assert build_cache(run)["rows_written"] == 0
    assert sorted(checked) == sorted(_manifest_shards(cache_dir))
    checked.clear()
    assert build_cache(run)["rows_written"] == 0
    assert checked == []  # sizes and mtimes match the stamp: no checksums recomputed


@pytest.mark.parametrize("setting, message", [
    ("cache.batch_size=0", "cache.batch_size: 0 is not a positive number"),
    ("cache.shard_rows=-3", "cache.shard_rows: -3 is not a positive number"),
    ("cache.zarr_codec=zstdd", "cache.zarr_codec: unknown codec 'zstdd'"),
    ("cache.device=gpu", "cache.device: 'gpu' is not auto, cpu, cuda or cuda:N"),
    ("cache.device=cuda:7", "cache.device=cuda:7 asked for, but"),
    ("cache.logits_from=api", "cache.logits_from: 'api' is not 'teacher' or 'data'"),
])
def test_bad_setting_refused_before_anything_is_written(tmp_path, setting, message):
    if setting.endswith("cuda:7") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    key, value = setting.split("=")
    with pytest.raises(UserError, match=re.escape(message)):
        build_cache(tiny_run_config(tmp_path, **{key: value}))
    assert list(tmp_path.iterdir()) == []  # no data prepared, no teacher trained, no cache folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cache.device=cuda asked for, but no CUDA GPU"):
        build_cache(tiny_run_config(tmp_path, **{"cache.device": "cuda"}))
    assert list(tmp_path.iterdir()) == []


def test_cache_left_by_a_bad_codec_accepts_the_fixed_command(tiny_workdir, tiny_cache, tmp_path):
    """Before the codec was checked up front, `zstdd` saved a manifest and then failed: the
    corrected command was refused forever. A cache without shards takes the new settings."""
    cache_dir = tmp_path / "codec"
    cache_dir.mkdir()
    d = json.loads((tiny_cache[1] / MANIFEST).read_text())
    d["layout"]["zarr_codec"], d["shards"], d["sets"] = "zstdd", [], {}
    (cache_dir / MANIFEST).write_text(json.dumps(d))
    summary = build_cache(_run_on(tiny_workdir, cache_dir, **{"cache.max_rows": 8}))
    assert summary["rows_written"] == 24
    assert Manifest.load(cache_dir).layout.zarr_codec == "none"  # the default


def test_cache_root_that_is_a_file(tiny_workdir, tmp_path):
    (tmp_path / "root").write_text("not a folder")
    with pytest.raises(UserError, match=f"cache.root=.*: {tmp_path / 'root'} is a file, not a folder"):
        build_cache(_run_on(tiny_workdir, tmp_path / "root" / "c"))


@pytest.fixture
def read_only_copy(tiny_cache, tmp_path):
    """The session cache on a read-only file system (root ignores mode bits; a remounted tmpfs does not)."""
    with tmpfs(tmp_path / "ro", "size=64m") as mnt:
        _copy(tiny_cache[1], mnt / "c")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt / "c"


def test_read_only_cache_is_one_line(tiny_workdir, read_only_copy):
    with pytest.raises(UserError, match=f"cache.root={read_only_copy}: cannot write in {read_only_copy}"):
        build_cache(_run_on(tiny_workdir, read_only_copy))


def test_sigterm_exits_143_and_the_same_command_resumes(tiny_workdir, tiny_cache, tmp_path):
    run = _run_on(tiny_workdir, tmp_path / "term", **{"cache.shard_rows": 16})
    args = _cli(run, "cache.batch_size=8")
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any((tmp_path / "term" / "shards").glob("*.json")):  # a shard committed (its record written)
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == ("interrupted: committed work is kept; run the same command again "
                                            "to resume")
    kept = TeacherCache(tmp_path / "term")
    assert 0 < len(kept) and kept.verify() == len(kept.manifest.shards)
    summary = build_cache(run)  # the same run again, in-process (saves a second interpreter start)
    assert summary["rows_written"] > 0 and summary["sets"]["train"]["already_cached"] > 0
    assert len(TeacherCache(tmp_path / "term")) == len(TeacherCache(tiny_cache[1]).row_table(["train", "dev", "test"]))


@pytest.mark.parametrize("error, code, words", [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/cache/x.arrow"), 2, "/srv/cache/x.arrow: permission"),
    (OSError(errno.EROFS, "Read-only file system", "/srv/cache"), 2, "/srv/cache: read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device", "/srv/cache"), 3, "disk full while writing /srv/cache"),
    (KeyboardInterrupt(), 130, "interrupted: committed work is kept"),
], ids=["permission", "read-only", "disk-full", "ctrl-c"])
def test_run_cli_turns_os_errors_into_one_line(capsys, error, code, words):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    err = capsys.readouterr().err.strip()
    assert e.value.code == code and len(err.splitlines()) == 1 and words in err, err


def test_run_cli_sigterm_exits_143_and_restores_the_handler(capsys):
    def main(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == 143 and "run the same command again to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
