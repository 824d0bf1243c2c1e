"""Is one student really better than another on the same test rows? The paired bootstrap over rows.

Two runs scored on the same test rows are paired: per row, the difference of their correctness (1, 0 or -1).
Over seeds, a row's difference is averaged over the seed pairs (a method's seed s against its `ce` twin of
seed s). Resampling the rows `resamples` times gives a 95% interval of the mean difference, and a difference
is called real when the interval excludes 0. The interval is the test rows' noise for these trained students;
the spread from seed to seed is reported beside it as the s.d. of the accuracies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data.io import UserError


def correctness(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, 1.0 where the prediction equals the gold label) of the labelled rows, sorted by row id."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no test predictions (a run finished before they were saved: retrain it, "
                        "or delete its folder)")
    table = pq.read_table(path, columns=["row_id", "label", "prediction"])
    labels, preds = table.column("label").to_numpy(), table.column("prediction").to_numpy()
    ids = np.asarray(table.column("row_id").to_pylist(), dtype=object)
    keep = labels >= 0
    order = np.argsort(ids[keep], kind="stable")
    return ids[keep][order], (preds[keep] == labels[keep]).astype(np.float64)[order]


def paired_difference(pairs: list[tuple[Path, Path]], resamples: int = 2000, seed: int = 0) -> dict:
    """Mean accuracy difference (first minus second) over the pairs' shared test rows, with its 95% bootstrap
    interval over rows; `real`: the interval excludes 0."""
    diffs, rows = [], None
    for a, b in pairs:
        ids_a, ok_a = correctness(a)
        ids_b, ok_b = correctness(b)
        if len(ids_a) != len(ids_b) or not (ids_a == ids_b).all() or (rows is not None and not (rows == ids_a).all()):
            raise UserError(f"{a} and {b}: not the same test rows; a paired comparison needs one test set")
        rows = ids_a
        diffs.append(ok_a - ok_b)
    d = np.mean(diffs, axis=0)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(resamples)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "real": bool(low > 0 or high < 0),
            "rows": int(len(d)), "pairs": len(pairs)}


def interval_text(ci: dict | None) -> str:
    """`+0.0213 [+0.0081, +0.0346] real` or `… within noise`."""
    if not ci:
        return ""
    verdict = "real" if ci["real"] else "within noise"
    return f"{ci['diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] {verdict}"
