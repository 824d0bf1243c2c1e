"""The checked-in bad-input corpus (tests/data/bad): each file gets its documented outcome.

Exit codes (README): 0 done, 2 bad input or config (one line on stderr), 3 disk full.
Quarantined rows are counted in meta.json and listed in quarantine.jsonl; nothing vanishes:
rows in = rows out + quarantined.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
