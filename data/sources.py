"""Read user data (CSV, JSONL, Parquet, a `datasets` folder, a hub name) into raw records.

Records are dicts {text, text_b, label, split, id}; data.rows.build_rows validates them.
Every problem names the file, row and field.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from data.io import UserError


def _pick(rec: dict, columns: dict[str, str | None], where: str) -> dict:
    out = {}
    for key, col in columns.items():
        if col is None:
            continue
        out[key] = rec.get(col)
    return out


def _check_columns(present: list[str], columns: dict[str, str | None], where: str) -> None:
    for key, col in columns.items():
        if col is not None and col not in present:
            hint = " (wrong delimiter? set data.delimiter)" if len(present) == 1 and any(
                c in present[0] for c in ";\t|,") else ""
            raise UserError(f"{where}: column {col!r} (for {key}) not found; columns are {present}{hint}")


def read_csv(path: Path, columns: dict, delimiter: str = ",", encoding: str = "utf-8") -> list[dict]:
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{path}: empty file")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        # Mixed encodings: keep the row, mark undecodable bytes so the row is quarantined by name.
        text = raw.decode(encoding, errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise UserError(f"{path}: no header row")
    _check_columns(list(reader.fieldnames), columns, str(path))
    records = [_pick(rec, columns, str(path)) for rec in reader]
    if not records:
        raise UserError(f"{path}: header only, no rows")
    return records


def read_jsonl(path: Path, columns: dict, encoding: str = "utf-8") -> tuple[list[dict], list[tuple[int, str]]]:
    records, bad = [], []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode(encoding))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                bad.append((n, f"not valid JSON ({type(e).__name__})"))
                continue
            if not isinstance(rec, dict):
                bad.append((n, "not a JSON object"))
                continue
            records.append({**_pick(rec, columns, str(path)), "_line": n})
    if not records and not bad:
        raise UserError(f"{path}: empty file")
    present = set().union(*(r.keys() for r in records))
    missing = [c for k, c in columns.items() if c is not None and k not in present and k != "text"]
    if "text" not in present:
        raise UserError(f"{path}: field {columns['text']!r} (for text) not found in any row")
    if missing:
        raise UserError(f"{path}: field(s) {missing} not found in any row")
    return records, bad


def _records_from_columns(data: dict[str, list], columns: dict, where: str) -> list[dict]:
    _check_columns(list(data), columns, where)
    n = len(next(iter(data.values()))) if data else 0
    if n == 0:
        raise UserError(f"{where}: no rows")
    picked = {k: data[c] for k, c in columns.items() if c is not None}
    return [{k: v[i] for k, v in picked.items()} for i in range(n)]


def read_parquet(path: Path, columns: dict) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    return _records_from_columns(table.to_pydict(), columns, str(path))


def read_hf_dataset(name_or_path: str, columns: dict) -> list[dict]:
    """A `save_to_disk` folder or (online) a hub dataset; a DatasetDict's splits become `split`."""
    import datasets

    try:
        if Path(name_or_path).is_dir():
            ds = datasets.load_from_disk(name_or_path)
        else:
            ds = datasets.load_dataset(name_or_path)
    except Exception as e:
        raise UserError(f"{name_or_path}: cannot load as a datasets folder or hub dataset ({e})") from None
    is_dict = isinstance(ds, datasets.DatasetDict)
    parts = ds.items() if is_dict else [(None, ds)]
    if is_dict:  # the DatasetDict's split names stand in for a split column
        columns = {k: v for k, v in columns.items() if k != "split"}
    records = []
    for split, part in parts:
        recs = _records_from_columns(part.to_dict(), columns, f"{name_or_path}[{split or 'all'}]")
        label_feature = part.features.get(columns.get("label") or "")
        names = getattr(label_feature, "names", None)
        for r in recs:
            if names and isinstance(r.get("label"), int) and r["label"] >= 0:
                r["label"] = names[r["label"]]
            elif isinstance(r.get("label"), int) and r["label"] < 0:
                r["label"] = None  # GLUE-style -1 = unlabelled test rows
            if split and "split" not in r:
                r["split"] = {"validation": "dev"}.get(split, split)
        records.extend(recs)
    return records


def read_records(source: str, columns: dict, delimiter: str = ",", encoding: str = "utf-8") -> tuple[list[dict], list]:
    """Dispatch on the file type. Returns (records, [(line, reason)] of unparseable lines)."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv", ".txt"):
            return read_csv(path, columns, "\t" if suffix == ".tsv" else delimiter, encoding), []
        if suffix in (".jsonl", ".json", ".ndjson"):
            return read_jsonl(path, columns, encoding)
        if suffix in (".parquet", ".pq"):
            return read_parquet(path, columns), []
        raise UserError(f"{path}: unknown file type {suffix!r} (CSV, TSV, JSONL, Parquet or a datasets folder)")
    if path.is_dir() or ("/" in source and not path.exists() and not source.startswith((".", "/"))):
        return read_hf_dataset(source, columns), []
    raise UserError(f"{source}: no such file or folder")


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
