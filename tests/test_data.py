"""Data in: every bad-input case gets a one-line error naming file/row/field, or a counted quarantine."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.config import ConfigError, load_config
from data.io import UserError
from data.prepare import DataConfig, load_split, prepare
from data.rows import make_row_id
from tests.conftest import REPO


def _cfg(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(source=str(source), out_dir=str(tmp_path / "out"), **kw)


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


GOOD = "text,label\n" + "".join(f"sentence number {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}\n"
                                for i in range(40))


def test_csv_split_is_stratified_stable_and_seeded(tmp_path):
    src = _write(tmp_path / "d.csv", GOOD)
    meta = prepare(_cfg(tmp_path, src))
    assert meta["label_names"] == ["neg", "pos"] and meta["rows"] == {"train": 32, "dev": 4, "test": 4}
    dev = load_split(tmp_path / "out", "dev")
    assert sorted(dev.column("label").to_pylist()) == [0, 0, 1, 1]
    first = dev.column("row_id").to_pylist()
    prepare(_cfg(tmp_path, src))
    assert load_split(tmp_path / "out", "dev").column("row_id").to_pylist() == first
    assert first[0] in {make_row_id("d", f"sentence number {i} is {w}") for i in range(40) for w in ("good", "bad")}


def test_quarantine_counts_every_bad_row(tmp_path):
    rows = GOOD + ",pos\n   ,neg\nfine text,maybe\nsentence number 1 is good,pos\n" + "x" * 30000 + ",pos\n"
    src = _write(tmp_path / "d.csv", rows.encode() + b"caf\xe9 latin1 bytes,neg\n")
    meta = prepare(_cfg(tmp_path, src, label_names=["neg", "pos"]))
    q = meta["quarantined"]
    assert q == {"empty or whitespace-only text": 2, "label not in ['neg', 'pos']": 1, "duplicate row id": 1,
                 "longer than 20000 characters": 1, "undecodable bytes": 1}
    assert sum(meta["rows"].values()) + sum(q.values()) == meta["rows_in"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert any(x["where"] == "d.csv row 42 field text" for x in lines)


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ("text,label\n", "header only"),
    ("text;label\nhello;pos\n", r"column 'text' \(for text\) not found.*wrong delimiter"),
])
def test_bad_files_one_line_errors(tmp_path, content, message):
    src = _write(tmp_path / "d.csv", content)
    with pytest.raises(UserError, match=message):
        prepare(_cfg(tmp_path, src))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        prepare(_cfg(tmp_path, tmp_path / "nope.csv"))
    with pytest.raises(UserError, match="unknown file type"):
        prepare(_cfg(tmp_path, _write(tmp_path / "d.xlsx", "x")))


def test_jsonl_pairs_unlabelled_and_bad_lines(tmp_path):
    lines = [json.dumps({"premise": f"a man plays {i}", "hypothesis": f"someone plays {i}"}) for i in range(20)]
    src = _write(tmp_path / "d.jsonl", "\n".join(lines[:10] + ["{not json"] + lines[10:]) + "\n")
    meta = prepare(_cfg(tmp_path, src, text_column="premise", text_b_column="hypothesis", label_column=None))
    assert meta["quarantined"] == {"not valid JSON (JSONDecodeError)": 1}
    train = load_split(tmp_path / "out", "train")
    assert train.column("label").null_count == train.num_rows
    assert train.column("text_b").to_pylist()[0].startswith("someone plays")


def test_parquet_and_datasets_folder(tmp_path):
    import datasets

    table = pa.table({"sentence": [f"row {i}" for i in range(30)], "y": [i % 3 for i in range(30)]})
    pq.write_table(table, tmp_path / "d.parquet")
    meta = prepare(_cfg(tmp_path, tmp_path / "d.parquet", text_column="sentence", label_column="y"))
    assert meta["label_names"] == ["0", "1", "2"] and sum(meta["rows"].values()) == 30
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": [f"t {i}" for i in range(20)], "label": [i % 2 for i in range(20)]},
                                            features=datasets.Features({"sentence": datasets.Value("string"),
                                                                        "label": datasets.ClassLabel(names=["no", "yes"])})),
        "validation": datasets.Dataset.from_dict({"sentence": ["v 1", "v 2"], "label": [0, 1]},
                                                 features=datasets.Features({"sentence": datasets.Value("string"),
                                                                             "label": datasets.ClassLabel(names=["no", "yes"])})),
    })
    ds.save_to_disk(tmp_path / "hf")
    meta = prepare(_cfg(tmp_path, tmp_path / "hf", text_column="sentence", split_column="split", label_names=["no", "yes"]))
    assert meta["rows"] == {"train": 20, "dev": 2, "test": 0}


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(DataConfig, None, ["max_rows=10", "label_names=a,b"])
    assert cfg.max_rows == 10 and cfg.label_names == ["a", "b"]
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(DataConfig, None, ["nope=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(DataConfig, None, ["max_rows=many"])


def test_cli_prints_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data.prepare", f"source={tmp_path / 'missing.csv'}"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.csv: no such file" in r.stderr
