"""Stage two under hostile but realistic use (issue 11): a run folder serves one config and one cache only,
bad names and settings are one line before anything is written, a full disk or a signal keeps the last
checkpoint. Real trainer, real tiny cache, a few steps per run; exit codes through data.io.run_cli."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer.steps
from data.io import run_cli
from tests.conftest import REPO, tmpfs
from trainer.train import main

BASE = ["students=textcnn", "losses=hinton", "baseline=false", "epochs=1", "batch_size=16", "max_steps_per_epoch=3",
        "checkpoint_every=1", "measure_latency=false"]


def cli(capsys, cache_dir, out, *extra) -> tuple[int, str, str]:
    """`python -m trainer.train BASE extra` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, [f"cache={cache_dir}", f"out_dir={out}", *BASE, *extra])
    got = capsys.readouterr()
    return e.value.code, got.out, got.err


def one_error_line(err: str) -> str:
    """The one line stderr holds besides progress bars."""
    lines = [x for x in err.splitlines() if x.strip() and not re.search(r"\d+/\d+ \[", x)]
    assert len(lines) == 1 and lines[0].startswith(("error:", "interrupted:")), err[-2000:]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tiny_cache, tmp_path_factory):
    """One finished BASE run (seed 0): what the other tests rerun against."""
    _, cache_dir = tiny_cache
    out = tmp_path_factory.mktemp("base")
    with pytest.raises(SystemExit) as e:
        run_cli(main, [f"cache={cache_dir}", f"out_dir={out}", *BASE])
    assert e.value.code == 0
    return cache_dir, out


@pytest.fixture
def copied(base_run, tmp_path):
    """A copy of the base run's out_dir to change."""
    cache_dir, out = base_run
    shutil.copytree(out, tmp_path / "out")
    return cache_dir, tmp_path / "out"


def test_changed_settings_train_in_a_new_folder(copied, capsys):
    cache_dir, out = copied
    before = snapshot(out / "textcnn-hinton")
    code, stdout, _ = cli(capsys, cache_dir, out, "seed=1")
    assert code == 0
    new = [p.name for p in out.iterdir() if p.name.startswith("textcnn-hinton-")]
    assert len(new) == 1 and f"holds a run with other settings (seed); training in {out / new[0]}" in stdout
    assert "resuming" not in stdout and snapshot(out / "textcnn-hinton") == before  # the old run is untouched
    code, stdout, _ = cli(capsys, cache_dir, out, "seed=1")  # the same again: that folder, finished, no retraining
    assert code == 0 and "resuming stage 1 at epoch 2" in stdout
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("textcnn-hinton")) == ["textcnn-hinton", new[0]]


@pytest.mark.parametrize("change", ["default_lr", "config_default"])
def test_a_changed_student_default_is_a_changed_run(copied, capsys, monkeypatch, change):
    """A run that leaves lr or a student setting to the default is keyed by the value it trains with: after a
    default changes, the finished run is not handed back as if it were the new one."""
    from trainer.students import TextCNNConfig, TextCNNStudent

    cache_dir, out = copied
    if change == "default_lr":
        monkeypatch.setattr(TextCNNStudent, "default_lr", TextCNNStudent.default_lr * 2)
    else:
        monkeypatch.setattr(TextCNNConfig, "__init__", _with_default(TextCNNConfig.__init__, "num_filters", 7))
    code, _, err = cli(capsys, cache_dir, out, "on_change=refuse")
    differing = "stages" if change == "default_lr" else "student_params"
    assert code == 2 and f"(differing: {differing})" in one_error_line(err)


def _with_default(init, name: str, value):
    def patched(self, *args, **kwargs):
        kwargs.setdefault(name, value)
        init(self, *args, **kwargs)
    return patched


def test_refuse_names_the_differing_settings_and_writes_nothing(copied, capsys):
    cache_dir, out = copied
    before = snapshot(out)
    code, _, err = cli(capsys, cache_dir, out, "seed=1", "label_budget=20", "on_change=refuse")
    assert code == 2
    assert "holds a run with other settings (differing: label_budget, seed)" in one_error_line(err)
    assert snapshot(out) == before


def test_overwrite_replaces_the_old_run(copied, capsys):
    cache_dir, out = copied
    code, stdout, _ = cli(capsys, cache_dir, out, "seed=1", "on_change=overwrite")
    assert code == 0 and "deleting it (on_change=overwrite)" in stdout and "resuming" not in stdout
    assert json.loads((out / "textcnn-hinton" / "run_key.json").read_text())["values"]["seed"] == 1
    assert [p.name for p in out.iterdir() if p.name.startswith("textcnn-hinton")] == ["textcnn-hinton"]


def test_checkpoint_of_another_cache_is_never_loaded(copied, tmp_path, capsys):
    """Same vocabulary size, same shards, another teacher: used to resume silently."""
    cache_dir, out = copied
    other = tmp_path / "other-cache"
    shutil.copytree(cache_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["teacher"]["weights_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, _ = cli(capsys, other, out)
    assert code == 0 and "holds a run with other settings (cache); training in" in stdout
    assert "resuming" not in stdout
    # a checkpoint copied in from that run is refused, not loaded
    new = next(p for p in out.iterdir() if p.name.startswith("textcnn-hinton-"))
    shutil.rmtree(out / "textcnn-hinton" / "checkpoint-stage0")
    shutil.copytree(new / "checkpoint-stage0", out / "textcnn-hinton" / "checkpoint-stage0")
    code, _, err = cli(capsys, cache_dir, out)
    assert code == 2 and "is a checkpoint of another run" in one_error_line(err)


def test_unknown_loss_is_one_line_from_the_real_command(tiny_cache, tmp_path):
    """The likeliest typo, end to end: no traceback, and the valid first run of the grid is not trained."""
    _, cache_dir = tiny_cache
    r = subprocess.run([sys.executable, "-m", "trainer.train", f"cache={cache_dir}", f"out_dir={tmp_path / 'out'}",
                        *BASE, "losses=hinton,hintn"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert one_error_line(r.stderr).startswith("error: unknown loss 'hintn'; known: ce, ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["students=textcnn,bilstmm"], "unknown student 'bilstmm'; known: bilstm, smallbert, textcnn"),
    (["batch_size=-8"], "bad settings: batch_size=-8 (must be >= 1)"),
    (["epochs=0"], "bad settings: epochs=0 (must be >= 1)"),
    (["patience=0", "log_every=0"], "bad settings: patience=0 (must be >= 1); log_every=0 (must be >= 1)"),
    (["runs=[{student: bilstm, loss: hinton, epochs: -2}]"], "run bilstm-hinton: epochs=-2, lr=0.0 (must be >= 0"),
    (["runs=[{student: bilstm, loss: hinton, lr: -0.1}]"], "run bilstm-hinton: epochs=0, lr=-0.1 (must be >= 0"),
    (["runs=[{student: bilstm, loss: hinton, loss_params: {tt: 2}}]"], "unknown key(s) ['tt']"),
    (["ema_decay=1"], "ema_decay=1.0 (must be in [0, 1))"),
    (["on_change=keep"], "on_change=keep (must be one of new, refuse, overwrite)"),
    (["verify=sometimes"], "verify=sometimes (must be true, false or full)"),
    (["device=cuda"], "device=cuda asked for, but no CUDA GPU"),
])
def test_bad_names_and_settings_refused_before_anything_is_written(tiny_cache, tmp_path, capsys, args, message):
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    _, cache_dir = tiny_cache
    code, _, err = cli(capsys, cache_dir, tmp_path / "out", *args)
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small", "size=64m") as mnt:
        yield mnt


def test_disk_full_keeps_the_last_checkpoint(base_run, small_disk, capsys):
    cache_dir, base = base_run
    size = sum(p.stat().st_size for p in (base / "textcnn-hinton" / "checkpoint-stage0").iterdir())
    # room for one checkpoint and half of the next: step 1's is saved, step 2's fills the disk
    subprocess.run(["mount", "-o", f"remount,size={int(1.5 * size) // 1024 + 64}k", str(small_disk)], check=True)
    code, _, err = cli(capsys, cache_dir, small_disk)
    assert code == 3
    line = one_error_line(err)
    assert line.startswith(f"error: disk full while writing {small_disk / 'textcnn-hinton' / 'checkpoint-stage0'}")
    assert "run the same command to resume" in line
    run = small_disk / "textcnn-hinton"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-stage0"]  # no .tmp left
    assert json.loads((run / "checkpoint-stage0" / "state.json").read_text())["global_step"] == 1
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    code, stdout, _ = cli(capsys, cache_dir, small_disk)
    assert code == 0 and "resuming stage 1 at epoch 1, 1 batches into it" in stdout
    assert (run / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_epoch_resumes_to_the_same_student(base_run, tmp_path, capsys, monkeypatch, request, signum, code):
    """A real signal right after step 2's checkpoint; the same command then ends where an uninterrupted run
    does, byte for byte."""
    cache_dir, base = base_run
    interrupted_then_resumed(capsys, monkeypatch, request, cache_dir, tmp_path, signum, code)
    final = "textcnn-hinton/checkpoint-stage0/model.safetensors"
    assert (tmp_path / final).read_bytes() == (base / final).read_bytes()


def interrupted_then_resumed(capsys, monkeypatch, request, cache_dir, out, signum, code, *extra) -> None:
    """A real signal right after step 2's checkpoint, then the same command again."""
    # a suite started as a shell's background job inherits SIGINT ignored; a terminal's Ctrl-C does not
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    save = trainer.steps.save_checkpoint

    def save_then_signal(*args):
        save(*args)
        if json.loads((args[0] / "state.json").read_text())["global_step"] == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(trainer.steps, "save_checkpoint", save_then_signal)
    got, _, err = cli(capsys, cache_dir, out, *extra)
    assert got == code and "run the same command again to resume" in one_error_line(err)
    monkeypatch.undo()
    got, stdout, _ = cli(capsys, cache_dir, out, *extra)
    assert got == 0 and "resuming stage 1 at epoch 1, 2 batches into it" in stdout


def test_weight_average_is_the_best_student_and_resumes(tiny_cache, tmp_path, capsys, monkeypatch, request):
    """ema_decay: best/ holds the moving average, not the last weights, and an interrupted run resumes its
    average to the same bytes as an uninterrupted one."""
    _, cache_dir = tiny_cache
    assert cli(capsys, cache_dir, tmp_path / "whole", "ema_decay=0.5")[0] == 0
    interrupted_then_resumed(capsys, monkeypatch, request, cache_dir, tmp_path / "resumed", signal.SIGTERM, 143,
                             "ema_decay=0.5")
    files = ["best/model.safetensors", "checkpoint-stage0/average.safetensors"]
    whole, resumed = ([(out / "textcnn-hinton" / f).read_bytes() for f in files] for out in
                      (tmp_path / "whole", tmp_path / "resumed"))
    assert whole == resumed
    run = tmp_path / "whole" / "textcnn-hinton"
    best, last = (load_file(str(run / f)) for f in ("best/model.safetensors", "checkpoint-stage0/model.safetensors"))
    average = {k.removeprefix("module."): v for k, v in
               load_file(str(run / "checkpoint-stage0/average.safetensors")).items() if k.startswith("module.")}
    assert best.keys() == average.keys() == last.keys()
    assert all(torch.equal(best[k], average[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)
