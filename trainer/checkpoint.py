"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint folder holds model + optimizer tensors (model.safetensors, optim.safetensors;
average.safetensors for a run that keeps a moving average of its weights) and state.json
(epoch, step, loader position, the Python/NumPy/torch/CUDA RNG states, scheduler, best score,
the run key). Checkpoints and best/ are written to `<name>.tmp` and swapped in by
renames, so a crash or a full disk leaves the previous one whole; a checkpoint of another run
(another key: other settings or another cache) is never loaded.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.io import UserError, fsync_dir


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@contextmanager
def _swapped_in(path: Path):
    """Yield `<path>.tmp` to fill, then swap it in for `path`. On any failure the temp folder goes (a full
    disk gets its space back) and a full disk is reported as OSError(ENOSPC) naming `path`, whatever raised
    it (safetensors has its own error type), so run_cli exits 3."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _swap(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) == errno.ENOSPC or (isinstance(e, SafetensorError) and "os error 28" in str(e)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def _swap(tmp: Path, path: Path) -> None:
    """Renames only: `path` moves to `<path>.old`, tmp to `path`, then the old one is deleted. A kill between
    the renames leaves `.old` whole, and recover_swaps() puts it back."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_swaps(folder: Path) -> None:
    """Finish swaps a kill interrupted: an `X.old` without `X` becomes `X` again; one beside `X` goes."""
    for old in Path(folder).glob("*.old"):
        final = old.with_suffix("")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def _weights(model: torch.nn.Module) -> dict:
    return _dedupe({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})


def save_checkpoint(path: Path, model: torch.nn.Module, opt, sched, state: dict, key: str, average=None) -> None:
    """`average`: the run's torch.optim.swa_utils.AveragedModel, or None."""
    with _swapped_in(path) as tmp:
        save_file(_weights(model), str(tmp / "model.safetensors"))
        if average is not None:
            save_file(_weights(average), str(tmp / "average.safetensors"))
        tensors, meta = _flatten_optimizer(opt)
        save_file(tensors, str(tmp / "optim.safetensors"))
        full = {**state, "run_key": key, "optimizer": meta, "scheduler": sched.state_dict() if sched else None,
                "rng": _rng_state()}
        (tmp / "state.json").write_text(json.dumps(full))


def save_best(model: torch.nn.Module, path: Path, label_names: list[str]) -> None:
    """The best student so far, swapped in whole: a user loading best/ never sees half of two students."""
    from trainer.students import save_student

    with _swapped_in(path) as tmp:
        save_student(model, tmp, label_names)


def _dedupe(tensors: dict) -> dict:
    """safetensors refuses shared storage: clone tied tensors."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.data_ptr(), v.numel(), v.dtype)
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def load_checkpoint(path: Path, model: torch.nn.Module, opt, sched, key: str, average=None) -> dict | None:
    """Restore in place (`average` too, when given); returns the saved state dict, or None when there is no
    checkpoint. A checkpoint saved under another run key is refused before anything of it is loaded."""
    if not (path / "state.json").is_file():
        return None
    state = json.loads((path / "state.json").read_text())
    if state.get("run_key") != key:
        raise UserError(f"{path} is a checkpoint of another run (other settings or another cache): "
                        "delete it, or train with resume=false")
    weights = load_file(str(path / "model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    changed = sorted(k for k, v in weights.items() if k in shapes and tuple(v.shape) != shapes[k])
    if changed or set(weights) != set(shapes):  # same settings, another model: e.g. the vocabulary changed
        raise UserError(f"{path} holds a student of another shape ({', '.join(changed[:3]) or 'other parameters'}; "
                        "the vocabulary or the code changed since): delete it, or train with resume=false")
    model.load_state_dict(weights)
    if average is not None:  # the run key holds ema_decay: a checkpoint of this run has its average
        average.load_state_dict(load_file(str(path / "average.safetensors")))
    _restore_optimizer(opt, load_file(str(path / "optim.safetensors")), state["optimizer"])
    if sched is not None and state.get("scheduler"):
        sched.load_state_dict(state["scheduler"])
    _set_rng_state(state.get("rng") or {"torch": state["torch_rng"]})  # older checkpoints: torch CPU only
    return state


def _rng_state() -> dict:
    """Every RNG a run draws from (Python, NumPy, torch CPU and each CUDA device) as JSON, so a resumed run
    continues each stream where it stopped."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(words), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.random.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _set_rng_state(rng: dict) -> None:
    """Restore what _rng_state saved; a state it lacks (an older checkpoint, a host with fewer GPUs) is left."""
    if "python" in rng:
        version, words, gauss = rng["python"]
        random.setstate((version, tuple(words), gauss))
    if "numpy" in rng:
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    for i, s in enumerate(rng.get("cuda", [])[: torch.cuda.device_count() if torch.cuda.is_available() else 0]):
        torch.cuda.set_rng_state(torch.tensor(s, dtype=torch.uint8), i)
