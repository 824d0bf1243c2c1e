"""Checkpoints restore every RNG a run draws from (Python, NumPy, torch CPU, CUDA when present), and a
checkpoint from before that (torch CPU state only) still loads."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from data.io import UserError
from trainer.checkpoint import load_checkpoint, save_checkpoint


def draws() -> list[float]:
    out = [random.random(), float(np.random.rand()), float(torch.rand(1))]
    return out + ([float(torch.rand(1, device="cuda"))] if torch.cuda.is_available() else [])


def saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "ck", model, opt, None, {"epoch": 0}, key="k")
    return model, opt


def test_every_rng_resumes_where_it_stopped(tmp_path):
    model, opt = saved(tmp_path)
    want = draws()
    draws()  # every stream moves on, as the run did after its checkpoint
    load_checkpoint(tmp_path / "ck", model, opt, None, "k")
    assert draws() == want


def test_checkpoint_with_only_the_torch_cpu_state_loads(tmp_path):
    model, opt = saved(tmp_path)
    state_file = tmp_path / "ck" / "state.json"
    state = json.loads(state_file.read_text())
    state["torch_rng"] = state.pop("rng")["torch"]  # as checkpoints were written before
    state_file.write_text(json.dumps(state))
    want = float(torch.rand(1))
    torch.rand(1)
    assert load_checkpoint(tmp_path / "ck", model, opt, None, "k")["epoch"] == 0
    assert float(torch.rand(1)) == want


def test_a_checkpoint_of_another_shape_is_refused_in_one_line(tmp_path):
    """Same settings, another model (a vocabulary built by changed code): refused before any weight loads."""
    saved(tmp_path)
    wider = torch.nn.Linear(4, 2)
    before = wider.weight.detach().clone()
    with pytest.raises(UserError, match=r"another shape \(weight; the vocabulary"):
        load_checkpoint(tmp_path / "ck", wider, torch.optim.AdamW(wider.parameters()), None, "k")
    assert torch.equal(wider.weight, before)
