"""`python -m trainer.export`: real tiny runs (BiLSTM, TextCNN, a small scratch BERT trained from the tiny cache)
exported to ONNX and TorchScript, checked against the eager student on the run's test rows, int8 included."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re

import numpy as np
import pytest
import torch

import trainer
from data.config import load_config
from data.io import run_cli
from trainer.export import main
from trainer.students import build_student, save_student
from trainer.train import TrainConfig, train_all
from trainer.vocab import Vocab

SCRATCH = {"init": "scratch", "num_layers": 2, "hidden_size": 96, "num_heads": 12, "intermediate_size": 128}


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """One short epoch of each built-in student; train_all writes the out_dir's config.json naming the cache."""
    _, cache_dir = tiny_cache
    out = tmp_path_factory.mktemp("export-runs")
    specs = ('[{student: bilstm, loss: ce}, {student: textcnn, loss: ce}, '
             f'{{student: smallbert, loss: ce, student_params: {json.dumps(SCRATCH)}}}]')
    items = {"cache": cache_dir, "out_dir": out, "runs": specs, "epochs": 1, "batch_size": 32,
             "max_steps_per_epoch": 2, "checkpoint_every": 0, "measure_latency": False, "baseline": False,
             "tensorboard": False, "verify": False}
    train_all(load_config(TrainConfig, None, [f"{k}={v}" for k, v in items.items()]))
    return out


def export(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        run_cli(main, list(args))
    return e.value.code, out.getvalue(), err.getvalue()


def check_of(folder) -> tuple[dict, dict]:
    """(check results by "eager"/"fp32"/"int8", the whole export.json)."""
    info = json.loads((folder / "export.json").read_text())
    return {r["model"].split()[-1]: r for r in info["check"]["results"]}, info


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("student", ["bilstm", "textcnn", "smallbert"])
def test_export_matches_eager_on_the_test_rows(runs, student, fmt):
    run = runs / f"{student}-ce"
    code, out, err = export(str(run), "--format", fmt, "--int8")
    assert code == 0, err
    results, info = check_of(run / f"export-{fmt}")
    assert info["check"]["source"].endswith("set test") and info["check"]["rows"] > 20
    assert results["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert results["fp32"]["accuracy"] == pytest.approx(results["eager"]["accuracy"])
    assert 0 <= results["int8"]["accuracy"] <= 1
    change = results["int8"]["accuracy"] - results["fp32"]["accuracy"]
    assert results["int8"]["accuracy_change"] == pytest.approx(change)
    assert info["label_names"] == ["negative", "neutral", "positive"]
    assert [i["name"] for i in info["inputs"]] == (["input_ids", "attention_mask"] if student == "smallbert"
                                                   else ["word_ids", "word_lengths"])
    assert (run / f"export-{fmt}" / ("tokenizer.json" if student == "smallbert" else "vocab.json")).is_file()
    assert "| " + fmt + " int8 |" in out and "max abs Δlogit" in out


def test_exported_folder_travels_alone(runs, tmp_path):
    """Only the export folder and onnxruntime: tokenise by export.json's rules, get the logits trainer.load gives."""
    import onnxruntime as ort

    run = runs / "bilstm-ce"
    assert export(str(run), "--format", "onnx", "--out", str(tmp_path / "ship"))[0] == 0
    spec = json.loads((tmp_path / "ship" / "export.json").read_text())
    itos = json.loads((tmp_path / "ship" / "vocab.json").read_text())["itos"]
    stoi, pattern = {w: i for i, w in enumerate(itos)}, re.compile(spec["tokenizer"]["pattern"], re.X)
    texts = ["I don't like this car...", "what a GREAT ride 🚗", ""]
    rows = [[stoi.get("[MASK]" if t == "[mask]" else t, 1) for t in pattern.findall(x.lower())] or [1] for x in texts]
    ids = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    session = ort.InferenceSession(str(tmp_path / "ship" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"word_ids": ids, "word_lengths": np.array([len(r) for r in rows])})[0]
    expected = trainer.load(str(run / "best")).predict_proba(texts).log().numpy()
    np.testing.assert_allclose(torch.tensor(logits).log_softmax(-1).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["bilstm", "textcnn"])
def test_pair_students_from_a_texts_file(kind, tmp_path):
    """Sentence pairs (4 inputs), BiLSTM's `last` pooling (final states of the packed sequences), short rows."""
    texts = ["what a great ride", "never getting in one of those", "ok", "the car broke down again today"]
    torch.manual_seed(0)
    params = {"hidden_size": 8, "pooling": "last"} if kind == "bilstm" else {"num_filters": 4}
    student = build_student(kind, {"num_labels": 2, "pair": True, "embeddings": None, "embed_dim": 16, **params},
                            vocab=Vocab.build(texts))
    save_student(student, tmp_path / "run" / "best", ["no", "yes"])
    lines = tmp_path / "pairs.txt"
    lines.write_text("\n".join(f"{a}\t{texts[(i + 1) % 4]}" for i, a in enumerate(texts * 20)) + "\n")
    for fmt in ("onnx", "torchscript"):
        code, _, err = export(str(tmp_path / "run"), "--format", fmt, "--int8", "--texts", str(lines))
        assert code == 0, err
        results, info = check_of(tmp_path / "run" / f"export-{fmt}")
        assert results["fp32"]["max_abs_logit_diff"] <= 1e-4 and results["fp32"]["accuracy"] is None
        assert [i["name"] for i in info["inputs"]] == ["word_ids", "word_lengths", "word_ids_b", "word_lengths_b"]
    single = tmp_path / "single.txt"
    single.write_text("just one sentence\n")
    code, _, err = export(str(tmp_path / "run"), "--format", "onnx", "--texts", str(single))
    assert code == 2 and "reads sentence pairs" in err


def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch):
    def one_line(*args) -> str:
        code, _, err = export(*args)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "no such run folder" in one_line(str(tmp_path / "nope"), "--format", "onnx")
    assert "not a trained run" in one_line(str(tmp_path), "--format", "torchscript")
    assert "invalid choice: 'tflite'" in one_line(str(tmp_path), "--format", "tflite")
    assert "--format" in one_line(str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert "'.[export]'" in one_line(str(tmp_path), "--format", "onnx")
    monkeypatch.undo()
    student = build_student("textcnn", {"num_labels": 2, "embeddings": None, "embed_dim": 8, "num_filters": 2},
                            vocab=Vocab.build(["a b c"]))
    save_student(student, tmp_path / "run" / "best", ["no", "yes"])
    assert "names its cache; pass --cache DIR or --texts FILE" in one_line(str(tmp_path / "run"), "--format", "onnx")
    (tmp_path / "t.txt").write_text("a b\nc\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "not an earlier export" in one_line(str(tmp_path / "run"), "--format", "onnx", "--texts",
                                               str(tmp_path / "t.txt"), "--out", str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    monkeypatch.setattr("trainer.export.TOLERANCE", -1.0)  # any difference fails the check
    err = one_line(str(tmp_path / "run" / "best"), "--format", "onnx", "--texts", str(tmp_path / "t.txt"))
    assert re.search(r"run run: onnx logits differ from the eager student's by up to \S+ \(> -1e\+00\); nothing "
                     r"written", err)
    assert not (tmp_path / "run" / "export-onnx").exists() and not (tmp_path / "run" / "export-onnx.tmp").exists()


def test_help():
    code, out, _ = export("--help")
    assert code == 0 and out.startswith("usage: python -m trainer.export") and "--int8" in out


@pytest.mark.parametrize("student", ["bilstm", "smallbert"])
def test_latency_table_beside_the_teacher(runs, tiny_cache, student, capsys):
    """`python -m trainer.latency`: every serving form at batch 1 and 64, 1 thread and all, beside the teacher
    the cache names (the tiny MiniLM teacher folder), written to the run folder."""
    from trainer.latency import BATCHES, main as latency_main

    run = runs / f"{student}-ce"
    assert latency_main([str(run), "--rows", "8"]) == 0
    info = json.loads((run / "latency.json").read_text())
    assert info["teacher"] == tiny_cache[0].teacher.out_dir
    forms = {"eager fp32", "eager int8", "torchscript fp32", "torchscript int8"}
    if importlib.util.find_spec("onnxruntime"):
        forms |= {"onnx fp32", "onnx int8"}
    threads = sorted({1, os.cpu_count()})
    got = {(r["model"], r["form"], r["batch"], r["threads"]) for r in info["results"]}
    assert got == {("student", f, b, t) for f in forms for b in BATCHES for t in threads} | \
        {("teacher", "eager fp32", b, t) for b in BATCHES for t in threads}
    for r in info["results"]:
        assert r["ms_per_sentence"] > 0 and r["sentences_per_s"] == pytest.approx(1000 / r["ms_per_sentence"])
        assert r["speedup"] == pytest.approx(next(
            t["ms_per_sentence"] for t in info["results"]
            if t["model"] == "teacher" and (t["batch"], t["threads"]) == (r["batch"], r["threads"])) / r["ms_per_sentence"])
    assert "× faster than teacher" in capsys.readouterr().out and (run / "latency.md").is_file()
