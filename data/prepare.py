"""`python -m data.prepare`: read a corpus, validate it into rows, split it once.

Output folder: train/dev/test Parquet (ROW_SCHEMA), meta.json (label names, source,
counts, quarantine counts, the inputs it was made from) and quarantine.jsonl when rows
were refused. `ensure_prepared` reuses the folder only when those inputs are the same.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data import assets
from data.config import parse_cli, save_config, to_dict
from data.io import UserError, atomic_write_bytes, atomic_write_text, check_output_dir, run_cli
from data.labels import resolve_labels
from data.rows import Quarantine, build_rows, read_rows, write_rows, table_fingerprint
from data.sources import read_records, source_fingerprint

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
    fold_label_case: bool = True  # "Negative", "NEGATIVE" and "negative" are one class (false: three)
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


KEY_VERSION = 2  # bump when the same inputs would now give other rows: older folders are prepared again


def check_config(cfg: DataConfig) -> None:
    """Refuse settings that would fail late or split nonsense, before anything is written."""
    if cfg.source == "tweets" and cfg.logits_column:
        raise UserError("data.logits_column: the built-in tweet corpus has no logits column")
    if cfg.max_rows < 0:
        raise UserError(f"data.max_rows: {cfg.max_rows} is negative (0 = every row)")
    for key in ("dev_fraction", "test_fraction"):
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"data.{key}: {getattr(cfg, key)} is not in [0, 1)")
    if cfg.dev_fraction + cfg.test_fraction >= 1:
        raise UserError(f"data.dev_fraction + data.test_fraction = {cfg.dev_fraction + cfg.test_fraction} "
                        "leaves no train rows")
    if len(cfg.delimiter) != 1:
        raise UserError(f"data.delimiter: {cfg.delimiter!r} is not one character")


def data_inputs(cfg: DataConfig) -> dict:
    """What a prepared folder depends on: every data setting but out_dir, the source by content."""
    inputs = {k: v for k, v in to_dict(cfg).items() if k != "out_dir"}
    return {**inputs, "source": source_fingerprint(cfg.source), "version": KEY_VERSION}


def differing_keys(recorded: dict | None, wanted: dict) -> list[str]:
    """The keys of `wanted` whose recorded value differs (all of them when nothing was recorded)."""
    recorded = recorded or {}
    return [k for k, v in wanted.items() if recorded.get(k) != v]


def ensure_prepared(cfg: DataConfig) -> dict:
    """meta of cfg.out_dir when it was prepared from exactly these inputs; else prepare it again,
    saying which inputs differ (a changed data.source must never reuse the old rows)."""
    out, inputs = Path(cfg.out_dir), data_inputs(cfg)
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):  # none yet, or unreadable: prepare
        return prepare(cfg, inputs)
    differ = differing_keys(meta.get("inputs"), inputs)
    if not differ and all((out / f"{s}.parquet").is_file() for s in SPLITS):
        return meta
    why = ("inputs not recorded by an older version" if "inputs" not in meta else
           f"{', '.join(differ)} differ" if differ else "split files missing")
    print(f"data: {out} was prepared from other inputs ({why}): preparing it again")
    return prepare(cfg, inputs)


def rows_fingerprint(table: pa.Table) -> str:
    """Order-independent hash of every row's id, texts, label and split: what a teacher learnt from."""
    columns = [table.column(c).to_pylist() for c in ("row_id", "text", "text_b", "label", "split")]
    h = hashlib.sha256()
    for row in sorted(zip(*columns), key=lambda r: r[0]):
        h.update(json.dumps(row).encode())
    return h.hexdigest()[:16]


def _by_split(table: pa.Table) -> dict[str, pa.Table]:
    return {s: table.filter(pa.compute.equal(table.column("split"), s)) for s in SPLITS}


def _label_warnings(parts: dict[str, pa.Table], names: list[str]) -> dict[str, int]:
    """Labels of dev/test rows that train never shows the teacher: {name: rows}."""
    in_train = set(parts["train"].column("label").drop_null().to_pylist())
    held_out = Counter(parts["dev"].column("label").drop_null().to_pylist() +
                       parts["test"].column("label").drop_null().to_pylist())
    return {names[k]: n for k, n in sorted(held_out.items()) if k not in in_train}


def _shared_with_train(parts: dict[str, pa.Table]) -> dict[str, int]:
    """dev/test rows whose text (and second text) is also a train row's: possible leakage."""
    def keys(t: pa.Table) -> list:
        return list(zip(t.column("text").to_pylist(), t.column("text_b").to_pylist()))

    train = set(keys(parts["train"]))
    return {s: sum(k in train for k in keys(parts[s])) for s in ("dev", "test")}


def _read_source(cfg: DataConfig) -> tuple[str, str, list[dict], list, list[str]]:
    """(source path, dataset name, records, unparseable lines, given label names)."""
    if cfg.source == "tweets":
        source = str(assets.tweets_csv())
        cols = {"text": "text", "text_b": None, "label": "sentiment", "id": None, "split": None}
        return source, cfg.name or "tweets", *read_records(source, cols, encoding="latin-1"), \
            cfg.label_names or TWEETS_LABELS
    records, bad = read_records(cfg.source, _columns(cfg), cfg.delimiter, cfg.encoding)
    return cfg.source, cfg.name or Path(cfg.source.rstrip("/")).stem, records, bad, cfg.label_names


def prepare(cfg: DataConfig, inputs: dict | None = None) -> dict:
    """Read, validate and split cfg.source into cfg.out_dir; meta.json records the inputs."""
    check_config(cfg)
    check_output_dir(cfg.out_dir, "data.out_dir")
    inputs = inputs or data_inputs(cfg)
    source, name, records, bad, given_names = _read_source(cfg)
    labels = resolve_labels([r.get("label") for r in records], given_names, cfg.fold_label_case, source)
    if labels.merged:
        print(labels.merged_line())
    quarantine = Quarantine()
    file_name = Path(source).name
    for line, reason in bad:
        quarantine.add(f"{file_name} line {line}", reason)
    given = {} if cfg.logits_column else None
    table = build_rows(records, source=name, file_name=file_name, labels=labels, quarantine=quarantine,
                       given_logits=given, keep_repeats=bool(cfg.split_column))
    undecodable = quarantine.counts().get("undecodable bytes", 0)
    hint = f"; not {cfg.encoding}? set data.encoding" if undecodable else ""
    if table.num_rows == 0:
        raise UserError(f"{source}: no usable rows ({quarantine.counts()}){hint}")
    if undecodable:
        print(f"data: {undecodable} row(s) with undecodable bytes quarantined{hint}")
    classes = set(table.column("label").drop_null().to_pylist())
    if len(labels.names) == 1 or (len(classes) == 1 and not given_names):  # given names: the teacher refuses
        raise UserError(f"{source}: one class only ({labels.names[min(classes, default=0)]!r}): a classifier needs "
                        "at least two (wrong data.label_column?)")
    if cfg.split_column:
        bad_split = set(table.column("split").to_pylist()) - set(SPLITS)
        if bad_split:
            raise UserError(f"{source}: field {cfg.split_column!r} has values {sorted(bad_split)}; expected {SPLITS}")
    else:
        table = split_rows(table, cfg)
    parts = _by_split(table)
    missing, shared = _label_warnings(parts, labels.names), _shared_with_train(parts)
    if missing:
        print(f"labels: {', '.join(f'{k!r} ({n} rows)' for k, n in missing.items())} in dev/test but not in train: "
              "the teacher never learns them")
    if any(shared.values()):
        print(f"data: {shared['dev']} dev and {shared['test']} test rows repeat a train text (possible leakage; kept)")
    out = Path(cfg.out_dir)
    for stale in ("meta.json", "quarantine.jsonl", GIVEN_LOGITS):  # a crash below must not leave old meta over new rows
        (out / stale).unlink(missing_ok=True)
    counts = {}
    for split, part in parts.items():
        write_rows(part, out / f"{split}.parquet")
        counts[split] = part.num_rows
    quarantine.write(out / "quarantine.jsonl")
    if given is not None:
        write_given_logits(out, table.column("row_id").to_pylist(), given)
    meta = {"name": name, "source": source, "label_names": labels.names, "rows_in": len(records) + len(bad),
            "rows": counts, "quarantined": quarantine.counts(), "unlabelled": table.column("label").null_count,
            "fingerprint": table_fingerprint(table), "data_fingerprint": rows_fingerprint(table),
            "labels_merged": labels.merged, "labels_missing_from_train": missing, "shared_with_train": shared,
            "inputs": inputs}
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
