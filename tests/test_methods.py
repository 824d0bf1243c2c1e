"""The distillation catalogue end to end: every registered loss trains a student from a cache.

Real parts only: the student_cache teacher (MiniLM cut to 2 layers, 1,200 tweets), a second,
weaker teacher cached over the same rows (Dynamic KD), real students and the real trainer.
"Learns" is measured on one fixed batch: the run's own objective, in eval mode, is lower for
the trained student than for the same student at initialisation.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from data.config import load_config, to_dict
from data.io import UserError
from pipeline.cache_reader import TeacherCache
from recipes.compare import CompareConfig, compare
from trainer.loader import CacheStream, StreamConfig, to_device
from trainer.losses import get_loss, loss_names
from trainer.paired import interval_text
from trainer.students import cached_inputs, text_encoder
from trainer.run_setup import default_loss_params
from trainer.steps import set_up, stage_loss_params
from trainer.together import train_group
from trainer.train import RunSpec, TrainConfig, main, plan_runs, train_run

# a small from-scratch BERT over the teacher's tokenizer: 96 wide (!= the teacher's 384, so the
# trainer must add the projections TinyBERT/DistilBERT/PKD use), 12 heads like the teacher
SCRATCH = {"init": "scratch", "num_layers": 2, "hidden_size": 96, "num_heads": 12, "intermediate_size": 128}
TOKEN_LEVEL = sorted(n for n in loss_names() if get_loss(n).token_level)


@pytest.fixture(scope="session")
def weak_cache(student_cache) -> Path:
    """A second, weaker teacher over the student_cache rows: MiniLM cut to 1 layer, one short
    epoch; logits + [CLS] only. Same data folder -> same row ids -> the caches join by row id."""
    from pipeline.teacher_cache import build_cache

    run, _ = student_cache
    weak = copy.deepcopy(run)
    weak.teacher.num_layers, weak.teacher.epochs, weak.teacher.max_train_rows = 1, 1, 480
    weak.teacher.batch_size, weak.teacher.lr = 32, 3e-4
    weak.teacher.out_dir = str(Path(run.teacher.out_dir).with_name("teacher-weak"))
    weak.cache.hidden_layers, weak.cache.attention_layers, weak.cache.store_values = "none", "none", False
    return Path(build_cache(weak)["cache"])


def _cfg(cache_dir, out, **kw) -> TrainConfig:
    items = {"cache": str(cache_dir), "out_dir": str(out), "epochs": 3, "batch_size": 32, "max_steps_per_epoch": 8,
             "log_every": 1, "checkpoint_every": 0, "measure_latency": False, **kw}
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in items.items()])


def _run(student: str, loss: str, **kw) -> RunSpec:
    return plan_runs(TrainConfig(runs=[RunSpec(student=student, loss=loss, **kw)], baseline=False))[0]


def _fixed_batch(cfg: TrainConfig, spec, student) -> dict:
    fields = sorted(set(spec.fields) | set(cached_inputs(student)))
    # 128 random train rows (shards are sorted by length inside: the first rows are the shortest)
    stream = CacheStream(cfg.cache, ["train"], fields, StreamConfig(batch_size=128, bucket_by_length=False, seed=7),
                         encode=text_encoder(student), second_cache=cfg.cache2 if spec.needs_second_teacher else None)
    batch = next(iter(stream))
    batch.pop("stream")
    return to_device(batch, torch.device("cpu"))


@torch.no_grad()
def _objective(model, spec, params, batch) -> tuple[float, dict]:
    model.eval()
    loss, parts = spec.fn(model(batch, frozenset(spec.student_needs)), batch, params, {})
    return float(loss), parts


def train_and_measure(run: RunSpec, cfg: TrainConfig):
    """Train with the real trainer's steps; the final stage's objective on one fixed batch before and after."""
    state = set_up(run, cfg)
    initial = copy.deepcopy(state.student)
    result = train_group([state])[0]
    last = len(state.stages) - 1
    spec, params = state.specs[last], stage_loss_params(state, last)
    batch = _fixed_batch(cfg, spec, initial)
    return result, _objective(initial, spec, params, batch), _objective(state.student, spec, params, batch), \
        state.student


# ---------------------------------------------------------------- every loss, small BERT

@pytest.mark.parametrize("loss", loss_names())
def test_every_registered_loss_trains_a_small_bert(loss, student_cache, weak_cache, tmp_path):
    _, cache_dir = student_cache
    cfg = _cfg(cache_dir, tmp_path, cache2=weak_cache)
    result, (before, _), (after, parts), model = train_and_measure(_run("smallbert", loss, student_params=SCRATCH,
                                                                        lr=5e-4), cfg)
    print(f"{loss}: objective on a fixed batch {before:.4f} -> {after:.4f}")
    assert after < before, f"{loss}: objective on a fixed batch {before:.4f} -> {after:.4f} ({parts})"
    assert result["loss"] == loss and 0 <= result["test_accuracy"] <= 1
    if get_loss(loss).fields and {"hidden", "cls"} & set(get_loss(loss).fields):
        assert model.projections is not None and model.projections["hid"].out_features == 384  # d_S 96 -> d_T 384


def test_tinybert_schedule_runs_both_stages_from_one_command(student_cache, tmp_path, capsys):
    """`make student STUDENT=smallbert LOSS=tinybert`: one command, stage 1 then stage 2."""
    _, cache_dir = student_cache
    rc = main([f"cache={cache_dir}", f"out_dir={tmp_path}", "students=smallbert", "losses=tinybert", "epochs=2",
               "batch_size=32", "max_steps_per_epoch=3", "log_every=1", "checkpoint_every=0", "measure_latency=false"])
    assert rc == 0
    records = [json.loads(x) for x in (tmp_path / "smallbert-tinybert" / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["stage"], r["epoch"]) for r in records if "train_loss" in r]
    assert epochs == [(1, 1), (1, 2), (2, 1)]  # 10:3 epochs scaled to 2 -> 2 + 1
    stage_parts = {r["stage"]: set(r) for r in records if "step" in r}
    assert {"emb", "hid", "att"} <= stage_parts[1] and "soft_ce" in stage_parts[2]
    result = json.loads((tmp_path / "smallbert-tinybert" / "result.json").read_text())
    assert result["loss"] == "tinybert" and (tmp_path / "smallbert-tinybert" / "best" / "model.safetensors").is_file()
    assert "smallbert-tinybert" in capsys.readouterr().out


# ---------------------------------------------------------------- word students

WORD_RUNS = [("bilstm", l) for l in ("hinton", "tang_mse", "dynakd_teacher", "dynakd_data", "pkd",
                                     "dynakd_supervision")] + [("textcnn", "pkd")]


@pytest.mark.parametrize("student,loss", WORD_RUNS)
def test_word_students_learn_from_logit_and_patient_losses(student, loss, student_cache, weak_cache, tmp_path):
    _, cache_dir = student_cache
    cfg = _cfg(cache_dir, tmp_path, cache2=weak_cache)
    result, (before, parts0), (after, parts), model = train_and_measure(_run(student, loss), cfg)
    print(f"{student}-{loss}: objective on a fixed batch {before:.4f} -> {after:.4f}")
    assert after < before, f"{student}-{loss}: {before:.4f} -> {after:.4f}"
    if loss in ("pkd", "dynakd_supervision"):
        # the learned projection of the student's states to the teacher width, found by the loss
        proj = model.projections["pkd"]
        width = {"bilstm": 300, "textcnn": 1000}[student]  # 2 directions x 150; 5 widths x 200 maps
        assert (proj.in_features, proj.out_features) == (width, 384)
        hid = "patient" if loss == "pkd" else "hidden"
        assert parts[hid] < parts0[hid]
        run = json.loads((tmp_path / f"{student}-{loss}" / "run.json").read_text())
        assert run["student_params"]["project_to"] == 384
        from trainer.students import load_student

        again = load_student(tmp_path / f"{student}-{loss}" / "best")  # reloads with its projection
        assert again.projections is not None


def test_pkd_maps_a_depth_one_student_to_the_top_non_final_teacher_layer(student_cache):
    _, cache_dir = student_cache
    cache = TeacherCache(cache_dir)
    bilstm = torch.nn.Module()  # depth 1: no num_layers attribute, like the word students
    assert default_loss_params("pkd", {}, bilstm, cache) == {"layer_map": [[1, 1]]}  # 2-layer teacher: N-1 = 1
    assert default_loss_params("pkd", {"layer_map": [[1, 2]]}, bilstm, cache) == {"layer_map": [[1, 2]]}
    assert default_loss_params("hinton", {}, bilstm, cache) == {}


@pytest.mark.parametrize("loss", TOKEN_LEVEL + ["tinybert"])
def test_token_level_losses_refuse_word_students(loss, student_cache, tmp_path):
    _, cache_dir = student_cache
    cfg = _cfg(cache_dir, tmp_path)
    with pytest.raises(UserError, match="compares token positions with the teacher's: use STUDENT=smallbert"):
        train_run(_run("bilstm", loss), cfg)
    assert not (tmp_path / f"bilstm-{loss}").exists()  # refused before anything is built or written


# ---------------------------------------------------------------- caches: layers, second teacher

def test_missing_teacher_layer_is_one_line_naming_the_cache_setting(student_cache, tmp_path):
    from pipeline.teacher_cache import build_cache

    run, cache_dir = student_cache
    few = copy.deepcopy(run)
    few.cache.name, few.cache.hidden_layers, few.cache.max_rows = "few-layers", "0,2", 40
    few_dir = build_cache(few)["cache"]
    cfg = _cfg(few_dir, tmp_path, epochs=1)
    with pytest.raises(UserError) as e:
        train_run(_run("smallbert", "tinybert_intermediate", student_params=SCRATCH), cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert "teacher hidden layer 1 is not in the cache" in msg and "cache.hidden_layers" in msg


def test_second_teacher_joins_by_row_id_and_refuses_missing_rows(student_cache, weak_cache, tmp_path):
    from pipeline.teacher_cache import build_cache

    run, cache_dir = student_cache
    ids = lambda path: set(TeacherCache(path).row_table(["train"], ["row_id"]).column("row_id").to_pylist())  # noqa
    assert ids(cache_dir) == ids(weak_cache)
    partial = copy.deepcopy(run)
    partial.teacher.out_dir = str(Path(run.teacher.out_dir).with_name("teacher-weak"))
    partial.teacher.num_layers = 1
    partial.cache.name, partial.cache.max_rows = "weak-partial", 32
    partial.cache.hidden_layers, partial.cache.attention_layers, partial.cache.store_values = "none", "none", False
    partial_dir = build_cache(partial)["cache"]
    with pytest.raises(UserError, match=r"second teacher cache .* lacks \d+ of the \d+ training rows"):
        train_run(_run("bilstm", "dynakd_teacher"), _cfg(cache_dir, tmp_path, cache2=partial_dir))


# ---------------------------------------------------------------- quality

def test_small_bert_distilled_with_hinton_beats_its_undistilled_twin(student_cache, tmp_path):
    """Few gold labels (150), teacher logits on every train row; a 1-layer BERT copied from MiniLM."""
    _, cache_dir = student_cache
    cfg = _cfg(cache_dir, tmp_path, epochs=2, max_steps_per_epoch=0, label_budget=150, seed=1)
    sp = {"num_layers": 1}
    ce = train_run(_run("smallbert", "ce", student_params=sp, lr=5e-4), cfg)
    kd = train_run(_run("smallbert", "hinton", student_params=sp, lr=5e-4), cfg)
    assert kd["teacher_test_accuracy"] > 0.55
    assert kd["test_accuracy"] > 0.5
    assert kd["test_accuracy"] >= ce["test_accuracy"] + 0.05


# ---------------------------------------------------------------- the comparison report

def test_compare_writes_table_and_chart(student_cache, weak_cache, tmp_path):
    run, cache_dir = student_cache
    weak_run = copy.deepcopy(run)
    weak_run.teacher.out_dir = str(Path(run.teacher.out_dir).with_name("teacher-weak"))
    weak_run.cache.name = weak_cache.name
    (tmp_path / "t1.yaml").write_text(json.dumps(to_dict(run)))
    (tmp_path / "t2.yaml").write_text(json.dumps(to_dict(weak_run)))
    cfg = load_config(CompareConfig, None, [
        f"teacher_config={tmp_path / 't1.yaml'}", f"teacher2_config={tmp_path / 't2.yaml'}",
        f"report={tmp_path / 'rep' / 'compare.md'}", f"plot={tmp_path / 'rep' / 'compare.png'}",
        f"train.out_dir={tmp_path / 'runs'}", "train.epochs=1", "train.max_steps_per_epoch=3",
        "train.measure_latency=false", "build_caches=false", "train.seeds=[0,1]",
        "train.runs=[{student: bilstm, loss: ce}, {student: bilstm, loss: hinton}, "
        "{student: bilstm, loss: dynakd_teacher}]"])
    rows = compare(cfg)
    assert [r["run"] for r in rows] == ["teacher", "teacher2 (weak)", "bilstm-ce", "bilstm-hinton",
                                        "bilstm-dynakd_teacher"]
    assert [r["n"] for r in rows[2:]] == [2, 2, 2] and rows[2]["vs_ce_ci"] is None
    n_test = TeacherCache(cache_dir).row_table(["test"], ["label"]).num_rows
    for row in rows[3:]:  # each method against its ce twin, seed by seed, over every test row
        ci = row["vs_ce_ci"]
        assert ci["pairs"] == 2 and ci["rows"] == n_test and ci["low"] <= ci["diff"] <= ci["high"]
        runs = json.loads((tmp_path / "rep" / "compare.json").read_text())["runs"]
        mine = [r for r in runs if r["setting"] == row["run"]]
        twins = {r["run"]: r["test_accuracy"] for r in runs}
        assert ci["diff"] == pytest.approx(sum(r["test_accuracy"] - twins[r["ce_twin"]] for r in mine) / 2)
    md = (tmp_path / "rep" / "compare.md").read_text()
    assert "| bilstm-dynakd_teacher | bilstm | Dynamic KD: teacher adjustment | T + T2 | 2 |" in md
    assert interval_text(rows[3]["vs_ce_ci"]) in md and "seeds 0, 1" in md
    assert "## Orderings" in md and "![test accuracy per run](compare.png)" in md
    assert (tmp_path / "rep" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "rep" / "compare.json").read_text())["rows"][0]["test_accuracy"] == \
        rows[0]["test_accuracy"]
    (tmp_path / "nope.yaml").write_text(json.dumps({"cache": {"root": str(tmp_path / "none")}}))
    with pytest.raises(UserError, match=r"no finished teacher cache at .*make teacher-cache CONFIG="):
        compare(CompareConfig(teacher_config=str(tmp_path / "nope.yaml"), build_caches=False))
