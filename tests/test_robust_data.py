"""Issue 11, data and teacher folder: every bad input is one line and exit 2, every prepared
folder is keyed by its inputs, labels and a data set's own splits come through whole.

Entry points run as the command line runs them (run_cli: one line on stderr, exit code), on
real files: tests/data/bad or files written here.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from data import prepare as data_prepare
from data.io import run_cli
from data.prepare import DataConfig, ensure_prepared, load_split
from pipeline import teacher_cache, train_teacher
from tests.conftest import REPO, tmpfs

BAD = REPO / "tests" / "data" / "bad"


def cli(main, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of an entry point run in-process, as its __main__ runs it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in args])
    return e.value.code, out.getvalue(), err.getvalue()


def refused(main, *args, message: str) -> str:
    code, _, err = cli(main, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    return err


def prep(tmp_path, source, *extra):
    return cli(data_prepare.main, f"source={source}", f"out_dir={tmp_path / 'data'}", *extra)


def meta_of(tmp_path) -> dict:
    return json.loads((tmp_path / "data" / "meta.json").read_text())


def labelled_csv(path: Path, labels: list[str], rows: int = 36) -> Path:
    picks = [labels[i % len(labels)] for i in range(rows)]
    path.write_text("text,label\n" + "".join(f"{label} sentence number {i},{label}\n" for i, label in enumerate(picks)))
    return path


# ---- the prepared folder is keyed by its inputs ----

def test_changed_source_is_prepared_again_not_reused(tmp_path, capsys):
    a = labelled_csv(tmp_path / "a.csv", ["neg", "pos"])
    b = labelled_csv(tmp_path / "b.csv", ["bad", "good", "meh"])
    cfg = DataConfig(source=str(a), out_dir=str(tmp_path / "data"))
    first = ensure_prepared(cfg)
    cfg.source = str(b)
    second = ensure_prepared(cfg)
    assert "prepared from other inputs (source differ): preparing it again" in capsys.readouterr().out
    assert second["label_names"] == ["bad", "good", "meh"] != first["label_names"]
    assert ensure_prepared(cfg) == second and "preparing it again" not in capsys.readouterr().out
    cfg.max_rows = 18
    assert sum(ensure_prepared(cfg)["rows"].values()) == 18
    assert "(max_rows differ)" in capsys.readouterr().out


def test_edited_source_file_is_prepared_again(tmp_path, capsys):
    src = labelled_csv(tmp_path / "d.csv", ["neg", "pos"])
    cfg = DataConfig(source=str(src), out_dir=str(tmp_path / "data"))
    ensure_prepared(cfg)
    labelled_csv(src, ["neg", "pos"], rows=40)
    assert sum(ensure_prepared(cfg)["rows"].values()) == 40
    assert "(source differ)" in capsys.readouterr().out


def test_folder_without_recorded_inputs_is_prepared_again(tmp_path, capsys):
    """A folder an older version prepared cannot prove what it holds."""
    cfg = DataConfig(source=str(labelled_csv(tmp_path / "d.csv", ["neg", "pos"])), out_dir=str(tmp_path / "data"))
    meta = ensure_prepared(cfg)
    (tmp_path / "data" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "inputs"}))
    assert ensure_prepared(cfg)["inputs"] == meta["inputs"]
    assert "(inputs not recorded by an older version): preparing it again" in capsys.readouterr().out


def test_same_inputs_give_same_rows_and_ids(tmp_path):
    ids = []
    for run in ("one", "two"):
        cfg = DataConfig(source=str(BAD / "own_split_repeats.csv"), split_column="split", out_dir=str(tmp_path / run))
        data_prepare.prepare(cfg)
        ids.append([load_split(tmp_path / run, s).column("row_id").to_pylist() for s in ("train", "dev", "test")])
    assert ids[0] == ids[1]


# ---- labels ----

def test_label_case_and_spaces_are_folded_and_reported(tmp_path):
    code, out, _ = prep(tmp_path, BAD / "labels_case.csv")
    assert code == 0
    assert "labels: merged 'NEGATIVE','Negative','negative ' -> 'negative'; 'Positive','positive' -> 'positive'" in out
    assert meta_of(tmp_path)["label_names"] == ["negative", "positive"]


def test_label_case_folding_can_be_turned_off(tmp_path):
    code, out, _ = prep(tmp_path, BAD / "labels_case.csv", "fold_label_case=false")
    assert code == 0 and "merged" not in out  # stripping alone merges nothing here
    assert meta_of(tmp_path)["label_names"] == ["NEGATIVE", "Negative", "Positive", "negative", "positive"]


def test_label_column_mixing_codes_and_names_is_refused(tmp_path):
    refused(data_prepare.main, f"source={BAD / 'labels_mixed.csv'}", f"out_dir={tmp_path / 'data'}",
            message="mixes integer codes ['0', '1', '2'] and names ['negative', 'positive']; set data.label_names")
    assert not (tmp_path / "data").exists()


def test_label_names_map_mixed_codes(tmp_path):
    code, _, err = prep(tmp_path, BAD / "labels_mixed.csv", "label_names=negative,neutral,positive")
    assert code == 0, err
    train = load_split(tmp_path / "data", "train")
    assert set(train.column("label").to_pylist()) == {0, 1, 2} and meta_of(tmp_path)["quarantined"] == {}


def test_one_class_is_refused(tmp_path):
    refused(data_prepare.main, f"source={BAD / 'one_class.csv'}", f"out_dir={tmp_path / 'data'}",
            message="one class only ('spam'): a classifier needs at least two")


def test_label_missing_from_train_is_warned_and_counted(tmp_path):
    code, out, _ = prep(tmp_path, BAD / "own_split_repeats.csv", "split_column=split")
    assert code == 0
    assert "labels: 'neutral' (1 rows) in dev/test but not in train" in out
    assert meta_of(tmp_path)["labels_missing_from_train"] == {"neutral": 1}


# ---- a data set's own split stays whole ----

def test_own_split_keeps_repeated_texts_and_reports_leakage(tmp_path):
    code, out, _ = prep(tmp_path, BAD / "own_split_repeats.csv", "split_column=split")
    assert code == 0
    meta = meta_of(tmp_path)
    assert meta["rows"] == {"train": 11, "dev": 2, "test": 3} and meta["quarantined"] == {}
    ids = [i for s in ("train", "dev", "test") for i in load_split(tmp_path / "data", s).column("row_id").to_pylist()]
    assert len(set(ids)) == len(ids) == 16
    assert meta["shared_with_train"] == {"dev": 0, "test": 1}
    assert "0 dev and 1 test rows repeat a train text (possible leakage; kept)" in out


def test_repeats_are_still_one_row_when_we_split(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("text,label\n" + "".join(f"t {i},{'ab'[i % 2]}\n" for i in range(20)) + "t 1,b\n")
    assert prep(tmp_path, src)[0] == 0
    assert meta_of(tmp_path)["quarantined"] == {"duplicate row id": 1}  # no leak across our own split


# ---- files and encodings ----

def test_duplicate_column_names_are_refused(tmp_path):
    refused(data_prepare.main, f"source={BAD / 'duplicate_columns.csv'}", f"out_dir={tmp_path / 'data'}",
            message="column(s) ['text'] appear more than once in the header")


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    code, _, err = prep(tmp_path, BAD / "bom.csv")
    assert code == 0, err
    assert meta_of(tmp_path)["label_names"] == ["no", "yes"]


def test_utf16_names_the_encoding_setting(tmp_path):
    refused(data_prepare.main, f"source={BAD / 'utf16.csv'}", f"out_dir={tmp_path / 'data'}",
            message="header looks garbled")
    err = cli(data_prepare.main, f"source={BAD / 'utf16.csv'}", f"out_dir={tmp_path / 'data'}")[2]
    assert "set data.encoding" in err
    assert prep(tmp_path, BAD / "utf16.csv", "encoding=utf-16")[0] == 0


def test_json_array_is_not_json_lines(tmp_path):
    refused(data_prepare.main, f"source={BAD / 'array.json'}", f"out_dir={tmp_path / 'data'}",
            message="a JSON array, not JSON Lines")


def test_csv_field_over_the_csv_module_limit_is_quarantined(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("text,label\n" + "x" * 200_000 + ",a\n" + "".join(f"t {i},{'ab'[i % 2]}\n" for i in range(20)))
    code, _, err = prep(tmp_path, src)
    assert code == 0, err
    assert meta_of(tmp_path)["quarantined"] == {"longer than 20000 characters": 1}


def test_folder_given_as_a_csv_file(tmp_path):
    (tmp_path / "d.csv").mkdir()
    refused(data_prepare.main, f"source={tmp_path / 'd.csv'}", f"out_dir={tmp_path / 'data'}",
            message="d.csv: a folder, not a .csv file")


def test_unreadable_input_file(tmp_path):
    """chmod 000 stops anyone but root: as root the command runs without the read-anything capabilities."""
    src = labelled_csv(tmp_path / "d.csv", ["neg", "pos"])
    src.chmod(0)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root reads any file; setpriv is needed to drop that")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    r = subprocess.run([*prefix, sys.executable, "-m", "data.prepare", f"source={src}", f"out_dir={tmp_path / 'data'}"],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    src.chmod(0o644)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{src}: cannot read it (Permission denied)" in r.stderr


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    refused(data_prepare.main, f"source={BAD / 'bom.csv'}", f"out_dir={tmp_path / 'data' / 'sub'}",
            message=f"{tmp_path / 'data'} is a file, not a folder")


def test_read_only_out_dir(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        refused(data_prepare.main, f"source={BAD / 'bom.csv'}", f"out_dir={mnt / 'data'}",
                message=f"data.out_dir={mnt / 'data'}: cannot write in {mnt} (Read-only file system)")


# ---- teacher settings and the teacher folder ----

def _teacher_args(tmp_path, source, *extra):
    return [f"data.source={source}", f"data.out_dir={tmp_path / 'data'}", f"teacher.out_dir={tmp_path / 'teacher'}",
            "teacher.num_layers=1", "teacher.max_length=16", "teacher.batch_size=16", "teacher.device=cpu", *extra]


@pytest.mark.parametrize("setting, message", [
    ("teacher.max_length=0", "teacher.max_length=0 (must be at least 8)"),
    ("teacher.max_length=1024", "teacher.max_length=1024: minilm has 512 positions"),
    ("teacher.batch_size=-8", "teacher.batch_size=-8 (must be at least 1)"),
    ("teacher.epochs=0", "teacher.epochs=0 (must be at least 1)"),
    ("teacher.checkpoint=/no/such/dir", "teacher checkpoint '/no/such/dir' not found"),
])
def test_teacher_settings_refused_before_anything_is_written(tmp_path, setting, message):
    refused(train_teacher.main, *_teacher_args(tmp_path, BAD / "bom.csv", setting), message=message)
    assert not (tmp_path / "data").exists() and not (tmp_path / "teacher").exists()


def test_teacher_folder_of_other_data_is_refused_then_retrained(tmp_path):
    """After a 3-label teacher, `teacher-cache` on 2-label data refuses (no crash, no silent reuse);
    `make teacher` re-trains into the folder after a notice; then caching works."""
    three = labelled_csv(tmp_path / "three.csv", ["neg", "neu", "pos"])
    two = labelled_csv(tmp_path / "two.csv", ["bad", "good"])
    assert cli(train_teacher.main, *_teacher_args(tmp_path, three))[0] == 0
    cache = [f"cache.root={tmp_path / 'cache'}", f"cache.augment_dir={tmp_path / 'none'}", "cache.device=cpu",
             "cache.hidden_layers=none", "cache.attention_layers=none", "cache.store_values=false"]
    err = refused(teacher_cache.main, *_teacher_args(tmp_path, two, *cache),
                  message=f"{tmp_path / 'teacher'}: teacher not fine-tuned on this data (data_fingerprint, label_names "
                          "differ); set teacher.out_dir")
    assert "make teacher" in err
    code, out, _ = cli(train_teacher.main, *_teacher_args(tmp_path, two))
    assert code == 0 and "was not fine-tuned on this data (data_fingerprint, label_names differ): re-training it" in out
    metrics = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert metrics["inputs"]["label_names"] == ["bad", "good"]
    code, _, err = cli(teacher_cache.main, *_teacher_args(tmp_path, two, *cache))
    assert code == 0, err[-2000:]


def test_teacher_refuses_one_class_of_train_rows(tmp_path):
    (tmp_path / "d.csv").write_text("text,label,split\n" + "".join(f"t {i},a,train\n" for i in range(6))
                                    + "d 1,b,dev\nd 2,a,test\n")
    refused(train_teacher.main, *_teacher_args(tmp_path, tmp_path / "d.csv", "data.split_column=split"),
            message="the labelled train rows hold one class only")


def test_rows_fingerprint_covers_labels(tmp_path):
    """The teacher key changes when only the labels change (same texts, same ids)."""
    table = pa.table({"row_id": ["a", "b"], "text": ["x", "y"], "text_b": [None, None], "label": [0, 1],
                      "split": ["train", "train"]})
    flipped = table.set_column(3, "label", pa.array([1, 0]))
    assert data_prepare.rows_fingerprint(table) != data_prepare.rows_fingerprint(flipped)
