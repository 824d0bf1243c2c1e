"""`python -m data.prepare`: read a corpus, validate it into rows, split it once.

Output folder: train/dev/test Parquet (ROW_SCHEMA), meta.json (label names, source,
counts, quarantine counts) and quarantine.jsonl when rows were refused.
"""
from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data import assets
from data.config import parse_cli, save_config
from data.io import UserError, atomic_write_bytes, atomic_write_text, run_cli
from data.rows import Quarantine, build_rows, read_rows, write_rows, table_fingerprint
from data.sources import read_records

SPLITS = ("train", "dev", "test")
TWEETS_LABELS = ["negative", "neutral", "positive"]


@dataclass
class DataConfig:
    source: str = "tweets"  # "tweets" (the default corpus) or a CSV/JSONL/Parquet/datasets path or hub name
    name: str = ""  # dataset name used in row ids; default: the file stem
    text_column: str = "text"
    text_b_column: str | None = None  # second sentence of a pair (e.g. hypothesis)
    label_column: str | None = "label"  # None: unlabelled rows
    id_column: str | None = None  # keep the data's own ids instead of hashing
    split_column: str | None = None  # use the data's own train/dev/test split
    logits_column: str | None = None  # teacher logits you already have (one list per row; cache.logits_from=data)
    label_names: list[str] = field(default_factory=list)  # empty: sorted distinct labels
    delimiter: str = ","
    encoding: str = "utf-8"
    max_rows: int = 0  # 0 = all; else a stratified, seeded subset before splitting
    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 13
    out_dir: str = "work/data/tweets"


def _columns(cfg: DataConfig) -> dict:
    return {"text": cfg.text_column, "text_b": cfg.text_b_column, "label": cfg.label_column,
            "id": cfg.id_column, "split": cfg.split_column, "logits": cfg.logits_column}


def _stratified_take(rows_by_label: dict, n: int, rng: random.Random) -> list:
    """Take about n rows keeping label proportions (rows pre-shuffled)."""
    total = sum(len(v) for v in rows_by_label.values())
    out = []
    for key in sorted(rows_by_label, key=str):
        k = round(n * len(rows_by_label[key]) / total)
        out.extend(rows_by_label[key][:k])
    return out


def split_rows(table: pa.Table, cfg: DataConfig) -> pa.Table:
    """Assign train/dev/test by a seeded stratified split (unless the data has its own)."""
    ids = table.column("row_id").to_pylist()
    labels = table.column("label").to_pylist()
    rng = random.Random(cfg.seed)
    by_label = defaultdict(list)
    for rid, lab in sorted(zip(ids, labels), key=lambda x: x[0]):
        by_label[lab].append(rid)
    for v in by_label.values():
        rng.shuffle(v)
    if cfg.max_rows and cfg.max_rows < len(ids):
        kept = set(_stratified_take(by_label, cfg.max_rows, rng))
        by_label = {k: [r for r in v if r in kept] for k, v in by_label.items()}
    split_of = {}
    for v in by_label.values():
        n_dev, n_test = round(len(v) * cfg.dev_fraction), round(len(v) * cfg.test_fraction)
        for i, rid in enumerate(v):
            split_of[rid] = "dev" if i < n_dev else "test" if i < n_dev + n_test else "train"
    mask = pa.array([rid in split_of for rid in ids])
    table = table.filter(mask)
    splits = pa.array([split_of[r] for r in table.column("row_id").to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("split"), "split", splits)


def prepare(cfg: DataConfig) -> dict:
    if cfg.source == "tweets" and cfg.logits_column:
        raise UserError("data.logits_column: the built-in tweet corpus has no logits column")
    if cfg.source == "tweets":
        source, name = str(assets.tweets_csv()), cfg.name or "tweets"
        cols = {"text": "text", "text_b": None, "label": "sentiment", "id": None, "split": None}
        label_names = cfg.label_names or TWEETS_LABELS
        records, bad = read_records(source, cols, encoding="latin-1")
    else:
        source, name = cfg.source, cfg.name or Path(cfg.source.rstrip("/")).stem
        records, bad = read_records(source, _columns(cfg), cfg.delimiter, cfg.encoding)
        label_names = cfg.label_names or sorted({str(r["label"]).strip() for r in records
                                                 if r.get("label") is not None and r["label"] == r["label"]})
    quarantine = Quarantine()
    file_name = Path(source).name
    for line, reason in bad:
        quarantine.add(f"{file_name} line {line}", reason)
    given = {} if cfg.logits_column else None
    table = build_rows(records, source=name, file_name=file_name, label_names=label_names, quarantine=quarantine,
                       given_logits=given)
    if table.num_rows == 0:
        raise UserError(f"{source}: no usable rows ({quarantine.counts()})")
    if cfg.split_column:
        bad_split = set(table.column("split").to_pylist()) - set(SPLITS)
        if bad_split:
            raise UserError(f"{source}: field {cfg.split_column!r} has values {sorted(bad_split)}; expected {SPLITS}")
    else:
        table = split_rows(table, cfg)
    out = Path(cfg.out_dir)
    counts = {}
    for split in SPLITS:
        part = table.filter(pa.compute.equal(table.column("split"), split))
        write_rows(part, out / f"{split}.parquet")
        counts[split] = part.num_rows
    quarantine.write(out / "quarantine.jsonl")
    if given is not None:
        write_given_logits(out, table.column("row_id").to_pylist(), given)
    meta = {"name": name, "source": source, "label_names": label_names, "rows_in": len(records) + len(bad),
            "rows": counts, "quarantined": quarantine.counts(), "unlabelled": table.column("label").null_count,
            "fingerprint": table_fingerprint(table)}
    if given is not None:
        meta["given_logits"] = {"column": cfg.logits_column, "rows": table.num_rows}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    save_config(cfg, out)
    return meta


GIVEN_LOGITS = "given_logits.parquet"


def write_given_logits(out: Path, row_ids: list[str], given: dict) -> None:
    """The user's teacher logits of the kept rows, by row id (read by cache.logits_from=data)."""
    table = pa.table({"row_id": pa.array(row_ids, pa.string()),
                      "logits": pa.array([given[r] for r in row_ids], pa.list_(pa.float32()))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out / GIVEN_LOGITS, sink.getvalue().to_pybytes())


def load_given_logits(data_dir: str | Path) -> dict[str, list[float]]:
    path = Path(data_dir) / GIVEN_LOGITS
    if not path.is_file():
        raise UserError(f"{path} not found: cache.logits_from=data needs data.logits_column (re-run `make data`)")
    table = pq.read_table(path)
    return dict(zip(table.column("row_id").to_pylist(), table.column("logits").to_pylist()))


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `make data` (python -m data.prepare) first")
    return json.loads(path.read_text())


def load_split(data_dir: str | Path, split: str) -> pa.Table:
    return read_rows(Path(data_dir) / f"{split}.parquet")


def main(argv: list[str]) -> int:
    cfg = parse_cli(DataConfig, argv)
    meta = prepare(cfg)
    q = sum(meta["quarantined"].values())
    print(f"data: {meta['rows_in']} rows in -> {meta['rows']} out, {q} quarantined {meta['quarantined'] or ''} "
          f"-> {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
