"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint folder holds model + optimizer tensors (model.safetensors, optim.safetensors)
and state.json (epoch, step, loader position, RNG states, scheduler, best score). It is
written to a temp folder and renamed, so a crash leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.io import atomic_replace_dir


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


def save_checkpoint(path: Path, model: torch.nn.Module, opt, sched, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_dedupe(weights), str(tmp / "model.safetensors"))
    tensors, meta = _flatten_optimizer(opt)
    save_file(tensors, str(tmp / "optim.safetensors"))
    full = {**state, "optimizer": meta, "scheduler": sched.state_dict() if sched else None,
            "torch_rng": torch.random.get_rng_state().tolist()}
    (tmp / "state.json").write_text(json.dumps(full))
    atomic_replace_dir(tmp, path)


def _dedupe(tensors: dict) -> dict:
    """safetensors refuses shared storage: clone tied tensors."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.data_ptr(), v.numel(), v.dtype)
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def load_checkpoint(path: Path, model: torch.nn.Module, opt, sched) -> dict | None:
    """Restore in place; returns the saved state dict, or None when there is no checkpoint."""
    if not (path / "state.json").is_file():
        return None
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    _restore_optimizer(opt, load_file(str(path / "optim.safetensors")), state["optimizer"])
    if sched is not None and state.get("scheduler"):
        sched.load_state_dict(state["scheduler"])
    torch.random.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state
