"""Read user data (CSV, JSONL, Parquet, a `datasets` folder, a hub name) into raw records.

Records are dicts {text, text_b, label, split, id}; data.rows.build_rows validates them.
Every problem names the file, row and field.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import sys
from collections import Counter
from pathlib import Path

from data.io import UserError, sha256_file, sha256_tree

# The over-long-row quarantine (data.rows) judges long fields; the csv module must not refuse them first.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


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


def _decoder(encoding: str) -> str:
    """data.encoding as a codec name; UTF-8 reads as utf-8-sig so Excel's BOM stays out of the first column."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"data.encoding: unknown encoding {encoding!r}") from None
    return "utf-8-sig" if name == "utf-8" else name


def _check_header(path: Path, header: list[str], columns: dict, encoding: str) -> None:
    """Refuse a header decoded with the wrong encoding, or one naming a used column twice."""
    if any("\x00" in h or "\ufffd" in h for h in header):
        raise UserError(f"{path}: the header looks garbled ({','.join(header)[:30]!r}): the file is not {encoding}; "
                        "set data.encoding (e.g. utf-16 or latin-1)")
    twice = sorted(c for c, n in Counter(header).items() if n > 1 and c in columns.values())
    if twice:
        raise UserError(f"{path}: column(s) {twice} appear more than once in the header; rename one of each")


def read_csv(path: Path, columns: dict, delimiter: str = ",", encoding: str = "utf-8") -> list[dict]:
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"{path}: empty file")
    codec = _decoder(encoding)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        # Mixed encodings: keep the row, mark undecodable bytes so the row is quarantined by name.
        text = raw.decode(codec, errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise UserError(f"{path}: no header row")
        _check_header(path, list(reader.fieldnames), columns, encoding)
        _check_columns(list(reader.fieldnames), columns, str(path))
        records = [_pick(rec, columns, str(path)) for rec in reader]
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num}: not readable as CSV ({e})") from None
    if not records:
        raise UserError(f"{path}: header only, no rows")
    return records


def read_jsonl(path: Path, columns: dict, encoding: str = "utf-8") -> tuple[list[dict], list[tuple[int, str]]]:
    records, bad = [], []
    codec = _decoder(encoding)
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not records and not bad and line.decode(codec, errors="replace").lstrip().startswith("["):
                raise UserError(f"{path}: a JSON array, not JSON Lines (one object per line); convert it, "
                                f"e.g. jq -c '.[]' {path.name} > {path.stem}.jsonl")
            try:
                rec = json.loads(line.decode(codec))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                bad.append((n, f"not valid JSON ({type(e).__name__})"))
                continue
            if not isinstance(rec, dict):
                bad.append((n, "not a JSON object"))
                continue
            records.append({**_pick(rec, columns, str(path)), "_line": n})
    if not records and not bad:
        raise UserError(f"{path}: empty file")
    if not records:
        raise UserError(f"{path}: no line is a JSON object (line {bad[0][0]}: {bad[0][1]}); "
                        f"is it JSON Lines in {encoding}? (data.encoding)")
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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{name_or_path}: cannot load as a datasets folder or hub dataset ({reason})") from None
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


FILE_TYPES = (".csv", ".tsv", ".txt", ".jsonl", ".json", ".ndjson", ".parquet", ".pq")


def read_records(source: str, columns: dict, delimiter: str = ",", encoding: str = "utf-8") -> tuple[list[dict], list]:
    """Dispatch on the file type. Returns (records, [(line, reason)] of unparseable lines)."""
    path = Path(source)
    try:
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix in (".csv", ".tsv", ".txt"):
                return read_csv(path, columns, "\t" if suffix == ".tsv" else delimiter, encoding), []
            if suffix in (".jsonl", ".json", ".ndjson"):
                return read_jsonl(path, columns, encoding)
            if suffix in (".parquet", ".pq"):
                return read_parquet(path, columns), []
            raise UserError(f"{path}: unknown file type {suffix!r} (CSV, TSV, JSONL, Parquet or a datasets folder)")
        if path.is_dir() and path.suffix.lower() in FILE_TYPES:
            raise UserError(f"{path}: a folder, not a {path.suffix} file")
        if path.is_dir() or ("/" in source and not path.exists() and not source.startswith((".", "/"))):
            return read_hf_dataset(source, columns), []
    except OSError as e:
        raise _unreadable(e, source) from None
    raise UserError(f"{source}: no such file or folder")


def _unreadable(e: OSError, source: str) -> UserError:
    return UserError(f"{e.filename or source}: cannot read it ({e.strerror or e})")


def source_fingerprint(source: str) -> dict:
    """What a prepared folder was made from: a file's path, size, mtime and content hash, a folder's
    path and tree hash, or just the name (the built-in corpus, a hub dataset)."""
    path = Path(source)
    if source == "tweets" or not path.exists():
        return {"name": source}
    try:
        if path.is_dir():
            return {"path": str(path.resolve()), "tree_sha256": sha256_tree(path)}
        stat = path.stat()
        return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "sha256": sha256_file(path)}
    except OSError as e:
        raise _unreadable(e, source) from None
