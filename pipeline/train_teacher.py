"""`python -m pipeline.train_teacher`: prepare the data split, then fine-tune the teacher.

`--data-only` stops after the split (rows validated, quarantine counted, Parquet written).
Teacher settings are checked before the data is written, so a typo costs nothing.
"""
from __future__ import annotations

from pathlib import Path

from data.config import parse_cli
from data.io import check_output_dir, run_cli
from data.prepare import prepare
from pipeline.run_config import RunConfig
from pipeline.teacher import check_config, finetune


def main(argv: list[str]) -> int:
    data_only = "--data-only" in argv
    run = parse_cli(RunConfig, [a for a in argv if a != "--data-only"])
    if not data_only:
        check_config(run.teacher)
        check_output_dir(run.teacher.out_dir, "teacher.out_dir")
    meta = prepare(run.data)
    quarantined = sum(meta["quarantined"].values())
    print(f"data {meta['name']}: {meta['rows_in']} rows in -> {meta['rows']}, {quarantined} quarantined "
          f"{meta['quarantined'] or ''} -> {run.data.out_dir}")
    if data_only:
        return 0
    metrics = finetune(run.teacher, run.data.out_dir)
    print(f"teacher {Path(run.teacher.out_dir)}: best dev accuracy {metrics['best']['accuracy']:.4f}, "
          f"test accuracy {metrics['test']['accuracy'] if metrics['test'] else float('nan'):.4f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
