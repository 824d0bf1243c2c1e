"""Seeds, sweeps and training curves (issue 12): one config expands into named runs keyed by their own
settings, ce twins pair per seed, repeats are summarised, and every run writes TensorBoard curves.
Real planner, real trainer on the tiny real cache (a few steps per run)."""
from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data.config import ConfigError, load_config
from data.io import UserError, run_cli
from tests.conftest import REPO
from tests.test_robust_train import one_error_line
from trainer.run_key import check_config
from trainer.sweep import summarise, summary_markdown
from trainer.train import TrainConfig, main, plan_runs

TINY = ["students=textcnn", "losses=hinton", "epochs=1", "batch_size=16", "max_steps_per_epoch=3", "log_every=1",
        "checkpoint_every=0", "measure_latency=false"]


def _plan(*args) -> list:
    cfg = load_config(TrainConfig, None, list(args))
    runs = plan_runs(cfg)
    check_config(cfg, runs)
    return runs


def test_seeds_and_sweep_expand_into_named_runs_with_one_ce_twin_per_student_and_seed():
    runs = _plan("seeds=[0,1]", "sweep={loss_params.t: [2, 4], loss_params.alpha: [0.5]}")
    assert [r.name for r in runs] == [
        "bilstm-ce-s0", "bilstm-hinton-t2-a0.5-s0", "bilstm-ce-s1", "bilstm-hinton-t2-a0.5-s1",
        "bilstm-hinton-t4-a0.5-s0", "bilstm-hinton-t4-a0.5-s1"]
    by_name = {r.name: r for r in runs}
    assert by_name["bilstm-hinton-t4-a0.5-s1"].loss_params == {"t": 4.0, "alpha": 0.5}
    assert by_name["bilstm-hinton-t4-a0.5-s1"].overrides == {"seed": 1}
    assert by_name["bilstm-ce-s1"].loss_params == {} and by_name["bilstm-ce-s1"].overrides == {"seed": 1}
    # student settings, lr and TrainConfig settings; the twin follows the student setting, not the loss params
    runs = _plan("losses=[ce,tang_mse]", "sweep={student_params.hidden_size: [150, 300], lr: ['1e-3'], "
                 "label_budget: [100]}")
    assert [(r.name, r.student_params, r.lr, r.overrides) for r in runs] == [
        ("bilstm-ce-hs150-lr0.001-lb100", {"hidden_size": 150}, 0.001, {"label_budget": 100}),
        ("bilstm-ce-hs300-lr0.001-lb100", {"hidden_size": 300}, 0.001, {"label_budget": 100}),
        ("bilstm-tang_mse-hs150-lr0.001-lb100", {"hidden_size": 150}, 0.001, {"label_budget": 100}),
        ("bilstm-tang_mse-hs300-lr0.001-lb100", {"hidden_size": 300}, 0.001, {"label_budget": 100})]
    # nested keys (what `sweep.loss_params.t=[2,4]` on the command line gives) are the same sweep
    assert [r.name for r in _plan("sweep.loss_params.t=[2,4]", "baseline=false")] == ["bilstm-hinton-t2",
                                                                                      "bilstm-hinton-t4"]
    assert [r.name for r in _plan()] == ["bilstm-ce", "bilstm-hinton"]  # no seeds, no sweep: as before


def test_the_methods_doc_example_parses_and_plans(tmp_path):
    text = (REPO / "docs" / "methods.md").read_text()
    (tmp_path / "sweep.yaml").write_text(text.split("## Seeds and sweeps")[1].split("```yaml\n")[1].split("```")[0])
    cfg = load_config(TrainConfig, tmp_path / "sweep.yaml")
    runs = plan_runs(cfg)
    check_config(cfg, runs)
    assert len({r.name for r in runs}) == 30 and sum(r.loss == "ce" for r in runs) == 6
    assert "bilstm-hinton-t4-a0.9-hs300-s2" in {r.name for r in runs}


@pytest.mark.parametrize("args, message", [
    (["sweep={foo: [1]}"], "sweep.foo: not a run setting"),
    (["sweep={cache: [a, b]}"], "sweep.cache: not a run setting"),
    (["sweep={lr: []}"], "sweep.lr: expected a non-empty list of values"),
    (["sweep={lr: 0.1}"], "sweep.lr: expected a non-empty list of values, got 0.1"),
    (["sweep={lr: [0.001, '1e-3']}"], "sweep.lr: [0.001, '1e-3'] lists a value twice"),
    (["sweep={seed: [1, 2]}"], "sweep.seed: list repeats under `seeds: [0, 1, 2]`"),
    (["seeds=[1,1]"], "seeds: [1, 1] lists a seed twice"),
    (["losses=ce", "sweep={loss_params.t: [2]}"], "sweep.loss_params.t: no run has this setting"),
    (["sweep={loss_params.alpha: [1.5]}"], "sweep.loss_params.alpha: alpha must be in [0, 1], got 1.5"),
    (["sweep={loss_params.t: [hot]}"], "sweep.loss_params.t: expected a number, got 'hot'"),
    (["sweep={label_budget: [-5]}"], "run bilstm-ce-lb-5: bad settings: label_budget=-5 (must be >= 0)"),
    (["runs=[{student: bilstm, loss: ce, overrides: {out_dir: x}}]"], "overrides cannot set out_dir"),
])
def test_bad_sweeps_are_one_line_errors_before_anything_is_written(tmp_path, capsys, args, message):
    with pytest.raises((UserError, ConfigError)) as refused:
        _plan(*args)
    assert message in str(refused.value)
    with pytest.raises(SystemExit) as e:
        run_cli(main, [f"out_dir={tmp_path / 'out'}", *args])
    assert e.value.code == 2 and message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_summary_ranks_settings_on_mean_dev_accuracy_and_reports_the_chosen_settings_test():
    rows = [("a-s0", "a", 0.70, 0.60, None), ("a-s1", "a", 0.72, 0.64, None),
            ("b-s0", "b", 0.75, 0.61, 0.01), ("b-s1", "b", 0.73, 0.59, -0.05), ("c", "c", 0.71, 0.90, 0.3)]
    results = [{"run": r, "setting": s, "dev_accuracy": d, "test_accuracy": t, "vs_ce": v} for r, s, d, t, v in rows]
    summary = summarise(results)
    assert [(s["rank"], s["setting"], s["n"]) for s in summary["settings"]] == [(1, "b", 2), (2, "a", 2), (3, "c", 1)]
    b = summary["settings"][0]
    assert b["dev_accuracy"]["mean"] == pytest.approx(0.74) and b["dev_accuracy"]["sd"] == pytest.approx(0.02 ** 0.5 / 10)
    assert b["vs_ce"]["mean"] == pytest.approx(-0.02) and summary["settings"][1]["vs_ce"] is None
    assert summary["chosen"]["setting"] == "b"  # not c, the best on test
    text = summary_markdown(summary)
    assert "| 1 | b | 2 | 0.7400 ± 0.0141 | 0.6000 ± 0.0141 | -0.0200 ± 0.0424 |" in text
    assert "| 3 | c | 1 | 0.7100 | 0.9000 | +0.3000 |" in text
    assert text.endswith("Chosen on dev: b, test accuracy 0.6000 ± 0.0141 (n = 2; mean ± s.d. over seeds).")


def test_a_seeded_sweep_trains_keyed_runs_pairs_twins_per_seed_and_writes_curves(tiny_cache, tmp_path, capsys):
    _, cache_dir = tiny_cache
    args = [f"cache={cache_dir}", f"out_dir={tmp_path}", *TINY, "seeds=[0,1]", "sweep={loss_params.t: [1, 4]}"]
    with pytest.raises(SystemExit) as e:
        run_cli(main, args)
    out = capsys.readouterr().out
    assert e.value.code == 0
    results = {r["run"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert sorted(results) == ["textcnn-ce-s0", "textcnn-ce-s1", "textcnn-hinton-t1-s0", "textcnn-hinton-t1-s1",
                               "textcnn-hinton-t4-s0", "textcnn-hinton-t4-s1"]
    for name, r in results.items():  # each run keyed and trained by its own seed and temperature
        key = json.loads((tmp_path / name / "run_key.json").read_text())["values"]
        assert key["seed"] == int(name[-1]) and "seeds" not in key and "sweep" not in key
        if "hinton" in name:
            assert key["stages"][0]["params"]["t"] == float(name.split("-t")[1][0])
            twin = results[f"textcnn-ce-s{name[-1]}"]
            assert r["vs_ce"] == pytest.approx(r["test_accuracy"] - twin["test_accuracy"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted((s["setting"], s["n"]) for s in summary["settings"]) == [
        ("textcnn-ce", 2), ("textcnn-hinton-t1", 2), ("textcnn-hinton-t4", 2)]
    assert out.index("| run |") < out.index("| rank | setting |") and "Chosen on dev: " in out
    assert (tmp_path / "summary.md").read_text().startswith("| rank | setting |")

    curves = EventAccumulator(str(tmp_path / "textcnn-hinton-t4-s1" / "tensorboard"))
    curves.Reload()
    tags = set(curves.Tags()["scalars"])
    assert {"train/loss", "train/kl", "train/ce", "train/lr", "dev/accuracy", "dev/macro_f1"} <= tags
    assert [ev.step for ev in curves.Scalars("train/loss")] == [1, 2, 3]
    assert [ev.step for ev in curves.Scalars("dev/accuracy")] == [3]
    assert curves.Scalars("dev/accuracy")[0].value == pytest.approx(results["textcnn-hinton-t4-s1"]["dev_accuracy"])

    # the same command again: every run is the run it was (same key, same folder), and a third seed adds runs
    with pytest.raises(SystemExit) as e:
        run_cli(main, args[:-2] + ["seeds=[0,1,2]", "sweep={loss_params.t: [1, 4]}"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "other settings" not in out and out.count("resuming stage 1 at epoch 2") == 6
    assert len(json.loads((tmp_path / "results.json").read_text())) == 9


def test_tensorboard_false_writes_no_curves(tiny_cache, tmp_path):
    _, cache_dir = tiny_cache
    with pytest.raises(SystemExit) as e:
        run_cli(main, [f"cache={cache_dir}", f"out_dir={tmp_path}", *TINY, "baseline=false", "tensorboard=false"])
    assert e.value.code == 0
    assert (tmp_path / "textcnn-hinton" / "best").is_dir() and not (tmp_path / "textcnn-hinton" / "tensorboard").exists()
