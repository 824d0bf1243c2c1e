"""The paired bootstrap of recipes/compare.py and the sweep summary, on prediction files as finish_run writes
them (Parquet: row_id, label, prediction, teacher)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.io import UserError
from trainer.paired import interval_text, paired_difference


def _write(path, labels, preds, order=None):
    ids = [f"test-{i:05d}" for i in range(len(labels))]
    order = np.arange(len(labels)) if order is None else order
    pq.write_table(pa.table({"row_id": [ids[i] for i in order], "label": np.asarray(labels)[order],
                             "prediction": np.asarray(preds)[order], "teacher": np.asarray(preds)[order]}), path)
    return path


def test_a_clear_gain_is_real_and_a_coin_flip_is_not(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    base = np.where(rng.random(2000) < 0.70, labels, (labels + 1) % 3)  # ~70% right
    better = np.where(rng.random(2000) < 0.5, labels, base)  # right on about half of base's mistakes too
    coin = np.where(rng.random(2000) < 0.5, base, np.where(rng.random(2000) < 0.7, labels, (labels + 2) % 3))
    a = _write(tmp_path / "base.parquet", labels, base)
    # row order on disk does not matter: rows are paired by id
    b = _write(tmp_path / "better.parquet", labels, better, order=rng.permutation(2000))
    c = _write(tmp_path / "coin.parquet", labels, coin)
    gain = paired_difference([(b, a)])
    assert gain["real"] and gain["low"] > 0 and gain["rows"] == 2000
    assert gain["diff"] == pytest.approx(np.mean(better == labels) - np.mean(base == labels))
    noise = paired_difference([(c, a)])
    assert not noise["real"] and noise["low"] < 0 < noise["high"]
    assert interval_text(noise).endswith("within noise") and interval_text(gain).endswith(" real")


def test_unlabelled_rows_are_left_out_and_seeds_average(tmp_path):
    labels = np.array([0, 1, -1, 2, 1, 0])
    a1 = _write(tmp_path / "a1.parquet", labels, [0, 1, 2, 2, 0, 0])  # 4/5 right
    b1 = _write(tmp_path / "b1.parquet", labels, [0, 0, 1, 2, 0, 0])  # 3/5
    a2 = _write(tmp_path / "a2.parquet", labels, [0, 1, 0, 2, 1, 0])  # 5/5
    b2 = _write(tmp_path / "b2.parquet", labels, [1, 0, 0, 2, 1, 0])  # 3/5
    out = paired_difference([(a1, b1), (a2, b2)], resamples=200)
    assert out["rows"] == 5 and out["pairs"] == 2 and out["diff"] == pytest.approx((0.2 + 0.4) / 2)


def test_other_test_rows_are_refused(tmp_path):
    a = _write(tmp_path / "a.parquet", [0, 1, 2], [0, 1, 2])
    b = _write(tmp_path / "b.parquet", [0, 1, 2, 1], [0, 1, 2, 1])
    with pytest.raises(UserError, match="not the same test rows"):
        paired_difference([(a, b)])
    with pytest.raises(UserError, match="no test predictions"):
        paired_difference([(a, tmp_path / "missing.parquet")])
