"""The checked-in bad-input corpus (tests/data/bad): each file gets its documented outcome.

Exit codes (README): 0 done, 2 bad input or config (one line on stderr), 3 disk full.
Quarantined rows are counted in meta.json and listed in quarantine.jsonl; nothing vanishes:
rows in = rows out + quarantined.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from data.config import load_config
from data.prepare import load_given_logits
from pipeline.cache_reader import TeacherCache
from pipeline.run_config import RunConfig
from pipeline.teacher_cache import build_cache
from tests.conftest import REPO

BAD = REPO / "tests" / "data" / "bad"


def prepare(tmp_path, name, *extra):
    return subprocess.run([sys.executable, "-m", "data.prepare", f"source={BAD / name}", f"out_dir={tmp_path}",
                           "label_names=negative,neutral,positive", *extra], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("name, message", [
    ("empty.csv", "empty.csv: empty file"),
    ("header_only.csv", "header_only.csv: header only, no rows"),
    ("wrong_delimiter.csv", "wrong delimiter? set data.delimiter"),
    ("missing.csv", "missing.csv: no such file or folder"),
])
def test_refused_files(tmp_path, name, message):
    r = prepare(tmp_path, name)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr


def test_messy_csv_quarantines_and_counts(tmp_path):
    r = prepare(tmp_path, "messy.csv", "id_column=id")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["quarantined"] == {"empty or whitespace-only text": 2, "longer than 20000 characters": 1,
                                   "label not in ['negative', 'neutral', 'positive']": 1, "duplicate row id": 1,
                                   "undecodable bytes": 1}
    assert meta["rows_in"] == 21 and sum(meta["rows"].values()) == 15 and meta["unlabelled"] == 1
    where = [json.loads(x)["where"] for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert "messy.csv row 13 field text" in where and "messy.csv row 18 field id" in where
    assert "6 quarantined" in r.stdout


def test_messy_jsonl(tmp_path):
    r = prepare(tmp_path, "messy.jsonl")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["quarantined"] == {"not valid JSON (JSONDecodeError)": 1, "not a JSON object": 1, "missing text": 1}
    assert meta["rows_in"] == 10 and sum(meta["rows"].values()) == 7 and meta["unlabelled"] == 1


def test_user_logits_column_quarantines_nan_inf_and_wrong_arity(tmp_path):
    r = prepare(tmp_path, "logits.csv", "id_column=id", "logits_column=teacher_logits")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["quarantined"] == {"logits: NaN or Inf": 3, "logits: expected 3 numbers, got 2": 1,
                                   "logits: missing or not a list of numbers": 1, "logits: expected 3 numbers, got 0": 1}
    assert meta["rows_in"] == 9 and sum(meta["rows"].values()) == 3 == meta["given_logits"]["rows"]
    where = {json.loads(x)["where"] for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()}
    assert "logits.csv row 4 field logits" in where  # l3: [nan, 1, 2]
    given = load_given_logits(tmp_path)
    assert given == {"l0": pytest.approx([0.1, 0.2, 2.5]), "l1": [3.0, -1.0, -2.0], "l2": [0.5, 1.5, -0.5]}


def test_user_logits_in_jsonl(tmp_path):
    r = prepare(tmp_path, "logits.jsonl", "logits_column=logits")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["quarantined"] == {"logits: NaN or Inf": 2, "logits: missing or not a list of numbers": 2}
    assert list(load_given_logits(tmp_path).values()) == [[0.5, -0.5, 1.0]]


def test_missing_logits_column_is_one_line(tmp_path):
    r = prepare(tmp_path, "logits.csv", "logits_column=scores")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "column 'scores' (for logits) not found" in r.stderr


def test_cache_takes_the_users_logits(tmp_path):
    """cache.logits_from=data: the cached logits are the user's, exactly; the encoder is not fine-tuned."""
    data = tmp_path / "data"
    assert prepare(data, "logits.csv", "id_column=id", "logits_column=teacher_logits").returncode == 0
    run = load_config(RunConfig, None, [f"data.out_dir={data}", f"data.source={BAD / 'logits.csv'}",
                                        "data.id_column=id", "data.logits_column=teacher_logits",
                                        "data.label_names=negative,neutral,positive", "teacher.checkpoint=minilm",
                                        f"teacher.out_dir={tmp_path / 'no-teacher'}", "teacher.max_length=32",
                                        f"cache.root={tmp_path}", "cache.name=given", "cache.logits_from=data",
                                        "cache.hidden_layers=none", "cache.attention_layers=none",
                                        "cache.store_values=false", "cache.cls_layers=none", "cache.device=cpu",
                                        f"cache.augment_dir={tmp_path / 'none'}"])
    build_cache(run)
    cache = TeacherCache(tmp_path / "given")
    assert cache.manifest.teacher.logits_from == "data:teacher_logits"
    assert not (tmp_path / "no-teacher").exists()
    for rid, want in load_given_logits(data).items():
        np.testing.assert_array_equal(cache.lookup(rid)["logits"], np.float32(want))
