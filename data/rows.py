"""Rows: the unit every stage reads and writes.

A row table is an Arrow table with ROW_SCHEMA. `row_id` is a stable hash of the row's
source and text (plus its position, for a repeated text the data's own split keeps), so
ids survive re-splitting, re-ordering and re-running; nothing downstream depends on row order.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data.io import UserError, atomic_write_bytes
from data.labels import Labels, is_missing_label

ROW_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("text_b", pa.string()),  # second sentence of a pair, else null
        pa.field("label", pa.int32()),  # index into label_names; null when unlabelled
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_id", pa.string()),  # the original row an augmented row came from
        pa.field("method", pa.string(), nullable=False),  # "original" or the augmenter's name
        pa.field("provenance", pa.string()),  # JSON: method parameters, seed, tagger/MLM identity
    ]
)

MAX_TEXT_CHARS = 20_000  # longer rows are quarantined: no tweet or sentence pair needs more


def make_row_id(source: str, text: str, text_b: str | None = None) -> str:
    """Stable 16-hex-digit id: hash of where the row comes from and what it says."""
    h = hashlib.sha1()
    for part in (source, text, text_b or ""):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def clean_text(text: str) -> str:
    """NFC-normalise, drop control characters, collapse whitespace."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    return " ".join(text.split())


@dataclass
class Quarantine:
    """Rows refused with a reason: counted, kept in a file, reported at the end."""

    rows: list[dict] = field(default_factory=list)

    def add(self, where: str, reason: str, value: object = None) -> None:
        self.rows.append({"where": where, "reason": reason, "value": None if value is None else repr(value)[:200]})

    def counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rows))

    def write(self, path: Path) -> None:
        if self.rows:
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def __len__(self) -> int:
        return len(self.rows)


def parse_logits(value, k: int) -> tuple[list[float] | None, str | None]:
    """A user-supplied logits cell -> (k finite floats, None) or (None, quarantine reason).

    Lists (JSONL, Parquet) or strings (CSV: "[0.1, -2, 3]", "0.1 -2 3", "0.1;-2;3").
    """
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,;\[\]]+", value) if p]
    elif isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        parts = list(value.tolist() if hasattr(value, "tolist") else value)
    else:
        return None, "logits: missing or not a list of numbers"
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        return None, "logits: missing or not a list of numbers"
    if len(numbers) != k:
        return None, f"logits: expected {k} numbers, got {len(numbers)}"
    if not all(math.isfinite(x) for x in numbers):
        return None, "logits: NaN or Inf"
    return numbers, None


def build_rows(
    records: list[dict],
    *,
    source: str,
    file_name: str,
    labels: Labels,
    quarantine: Quarantine,
    default_split: str = "train",
    truncate_chars: int = MAX_TEXT_CHARS,
    given_logits: dict | None = None,
    keep_repeats: bool = False,
) -> pa.Table:
    """Validate raw records {text, text_b?, label?, split?, id?, logits?} into a ROW_SCHEMA table.

    Empty text, unknown labels, duplicate ids and (when `given_logits` is a dict: the user
    supplies teacher logits) logits that are not len(labels.names) finite numbers go to
    `quarantine` with file/row/field; good logits land in `given_logits[row_id]`.
    Without an id column a row's id hashes its text, so a repeated text is a duplicate id,
    unless `keep_repeats` (the data brings its own split, which must stay whole): then a
    repeat's id also hashes its position in the source (still the same on every run).
    """
    seen: set[str] = set()
    out: dict[str, list] = {f.name: [] for f in ROW_SCHEMA}
    for i, rec in enumerate(records):
        where = f"{file_name} line {rec['_line']}" if "_line" in rec else f"{file_name} row {i + 1}"
        text = rec.get("text")
        if not isinstance(text, str):
            quarantine.add(f"{where} field text", "missing text", text)
            continue
        if "\ufffd" in text:
            quarantine.add(f"{where} field text", "undecodable bytes", text)
            continue
        if len(text) > truncate_chars:
            quarantine.add(f"{where} field text", f"longer than {truncate_chars} characters", len(text))
            continue
        text = clean_text(text)
        if not text:
            quarantine.add(f"{where} field text", "empty or whitespace-only text")
            continue
        text_b = rec.get("text_b")
        if text_b is not None:
            text_b = clean_text(str(text_b))
            if not text_b:
                quarantine.add(f"{where} field text_b", "empty second sentence")
                continue
        label = rec.get("label")
        if is_missing_label(label):
            label = None  # an empty cell: an unlabelled row
        elif (index := labels.index(label)) is not None:
            label = index
        else:
            quarantine.add(f"{where} field label", f"label not in {labels.names}", label)
            continue
        logits = None
        if given_logits is not None:
            logits, reason = parse_logits(rec.get("logits"), len(labels.names))
            if reason:
                quarantine.add(f"{where} field logits", reason, rec.get("logits"))
                continue
        own_id = rec.get("id") not in (None, "")
        row_id = str(rec["id"]) if own_id else make_row_id(source, text, text_b)
        if row_id in seen and keep_repeats and not own_id:
            row_id = make_row_id(f"{source}#{rec.get('_line', i + 1)}", text, text_b)
        if row_id in seen:
            quarantine.add(f"{where} field id", "duplicate row id", row_id)
            continue
        seen.add(row_id)
        if logits is not None:
            given_logits[row_id] = logits
        out["row_id"].append(row_id)
        out["text"].append(text)
        out["text_b"].append(text_b)
        out["label"].append(label)
        out["split"].append(str(rec.get("split") or default_split))
        out["source_id"].append(None)
        out["method"].append("original")
        out["provenance"].append(None)
    return pa.Table.from_pydict(out, schema=ROW_SCHEMA)


def write_rows(table: pa.Table, path: str | Path) -> None:
    """Parquet, written atomically, schema checked."""
    table = table.cast(ROW_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_rows(path: str | Path) -> pa.Table:
    """Read a row table and check it has the row schema (extra columns are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: row file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [f.name for f in ROW_SCHEMA if f.name not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing row column(s) {missing}")
    return table.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)


def table_fingerprint(table: pa.Table) -> str:
    """Order-independent hash of a row table's ids and texts."""
    h = hashlib.sha256()
    ids = table.column("row_id").to_pylist()
    texts = dict(zip(ids, table.column("text").to_pylist()))
    for rid in sorted(ids):
        h.update(rid.encode())
        h.update(texts[rid].encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]
