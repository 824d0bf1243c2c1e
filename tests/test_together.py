"""K runs trained in one pass over the cache (`together`) end exactly as they do one by one: same weights (best
and final), same dev and test figures, same checkpoints. Real students from the student_cache teacher."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from data.config import load_config
from trainer.train import TrainConfig, train_all

SCRATCH = {"init": "scratch", "num_layers": 2, "hidden_size": 96, "num_heads": 12, "intermediate_size": 128}
RUNS = [{"student": "bilstm", "loss": "hinton"},
        {"student": "bilstm", "loss": "tang_mse", "student_params": {"dropout": 0.3}},
        {"student": "textcnn", "loss": "hinton"},
        {"student": "bilstm", "loss": "pkd"},  # a learned projection and the [CLS] field
        {"student": "bilstm", "loss": "ce", "name": "bilstm-ce-budget", "overrides": {"label_budget": 100}},
        {"student": "bilstm", "loss": "hinton", "name": "bilstm-hinton-seed1", "overrides": {"seed": 1}},
        # small BERTs on the teacher's token ids, hidden states and attention (a bounded shuffle window)
        {"student": "smallbert", "loss": "minilm", "student_params": SCRATCH, "lr": 5e-4},
        {"student": "smallbert", "loss": "distilbert", "student_params": SCRATCH, "lr": 5e-4}]


def _train(cache_dir, out, together: int) -> list[dict]:
    items = {"cache": str(cache_dir), "out_dir": str(out), "epochs": 2, "batch_size": 32, "max_steps_per_epoch": 6,
             "log_every": 2, "checkpoint_every": 4, "measure_latency": False, "tensorboard": False,
             "baseline": False, "together": together, "runs": json.dumps(RUNS)}
    return train_all(load_config(TrainConfig, None, [f"{k}={v}" for k, v in items.items()]))


def test_runs_trained_together_end_as_they_would_alone(student_cache, tmp_path, capsys):
    _, cache_dir = student_cache
    alone = _train(cache_dir, tmp_path / "alone", together=1)
    assert "in one pass over the cache" not in capsys.readouterr().out
    together = _train(cache_dir, tmp_path / "together", together=8)
    out = capsys.readouterr().out
    # the four seed-0 distilled runs read the same batches; ce reads gold rows only, seed 1 another shuffle
    assert "4 runs in one pass over the cache: bilstm-hinton, bilstm-tang_mse, textcnn-hinton, bilstm-pkd" in out
    assert "2 runs in one pass over the cache: smallbert-minilm, smallbert-distilbert" in out
    assert [r["run"] for r in together] == [r["run"] for r in alone]
    for a, t in zip(alone, together):
        for key in ("dev_accuracy", "dev_macro_f1", "test_accuracy", "test_macro_f1", "test_teacher_agreement"):
            assert a[key] == t[key], (a["run"], key)
        for path in ("best/model.safetensors", "checkpoint-stage0/model.safetensors",
                     "checkpoint-stage0/optim.safetensors"):
            wa, wt = (load_file(str(tmp_path / side / a["run"] / path)) for side in ("alone", "together"))
            assert wa.keys() == wt.keys()
            for name in wa:
                assert wa[name].equal(wt[name]), (a["run"], path, name)
        states = [json.loads((tmp_path / side / a["run"] / "checkpoint-stage0" / "state.json").read_text())
                  for side in ("alone", "together")]
        assert states[0]["rng"] == states[1]["rng"] and states[0]["history"][-1]["dev_accuracy"] == \
            states[1]["history"][-1]["dev_accuracy"]


@pytest.mark.parametrize("together", [0, -1])
def test_together_must_be_positive(together, student_cache, tmp_path):
    from data.io import UserError

    _, cache_dir = student_cache
    with pytest.raises(UserError, match="together"):
        _train(cache_dir, tmp_path, together)
