"""What a teacher cache holds, without any model code:

    python -m pipeline.inspect CACHE [--rows N] [--verify] [--json]

Manifest version, teacher, tokenizer, stored layout; per set: rows, shards, tokens, label and length
histograms, the teacher's accuracy and macro-F1 on gold rows; bytes per field and per row; the rows the data
step quarantined; N sample rows with the teacher's prediction. `--verify` checksums every shard (a training
run checksums only shards whose files changed since they were last verified). CACHE may be a URL (pulled).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from data.io import CliParser, UserError, run_cli
from data.metrics import classification_metrics
from pipeline.cache_reader import TeacherCache
from pipeline.cache_schema import DATA_INFO, TOKENIZER_DIR, zarr_path

LENGTH_BINS = (8, 16, 32, 64, 128, 256, 512)


def tokenizer_info(cache: TeacherCache) -> dict:
    """Where the teacher's tokenizer is and its vocabulary size (read from its files, no transformers)."""
    folder = cache.tokenizer_dir
    if folder is None:
        return {"where": None, "note": "none: built before caches carried their tokenizer, teacher folder absent"}
    size = None
    if (folder / "tokenizer.json").is_file():
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = spec.get("model", {}).get("vocab") or {}
        size = len(vocab) + sum(1 for t in spec.get("added_tokens", []) if t.get("content") not in vocab)
    elif (folder / "vocab.txt").is_file():
        size = sum(1 for _ in (folder / "vocab.txt").open(encoding="utf-8"))
    return {"where": "cache" if folder.name == TOKENIZER_DIR and folder.parent == cache.dir else str(folder),
            "vocab_size": size, "sha256": cache.manifest.teacher.tokenizer_sha256}


def field_bytes(cache: TeacherCache) -> dict[str, int]:
    """Bytes on disk per stored field: Arrow columns (buffer sizes) and Zarr arrays (their chunk files)."""
    out: dict[str, int] = {}
    for info in cache.manifest.shards:
        table = cache.reader(info).table
        for name in table.column_names:
            group = name if name in ("logits", "cls", "input_ids") else "row fields"
            out[group] = out.get(group, 0) + table.column(name).nbytes
        z = zarr_path(cache.dir, info.name)
        for array in sorted(p for p in z.iterdir() if p.is_dir()) if z.is_dir() else ():
            out[array.name] = out.get(array.name, 0) + sum(f.stat().st_size for f in array.rglob("*") if f.is_file())
    return out


def set_summary(cache: TeacherCache, set_name: str) -> dict:
    t = cache.row_table([set_name], ["label", "length"])
    logits = np.concatenate([cache.reader(s).read(0, s.rows, ("logits",))["logits"] for s in cache.shards([set_name])])
    labels = np.array([-1 if y is None else y for y in t.column("label").to_pylist()])
    lengths = t.column("length").to_numpy()
    names = cache.label_names
    shards = cache.shards([set_name])
    out = {"rows": t.num_rows, "shards": len(shards), "tokens": int(sum(s.tokens for s in shards)),
           "labels": {n: int(np.sum(labels == k)) for k, n in enumerate(names)},
           "unlabelled": int(np.sum(labels < 0)),
           "length": {"mean": round(float(lengths.mean()), 1), "max": int(lengths.max()),
                      "histogram": _histogram(lengths, cache.manifest.max_length)}}
    keep = labels >= 0
    if keep.any():
        m = classification_metrics(logits[keep].argmax(-1), labels[keep], len(names))
        out["teacher"] = {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4)}
    return out


def _histogram(lengths: np.ndarray, max_length: int) -> dict[str, int]:
    edges = [0, *(b for b in LENGTH_BINS if b < max_length), max_length]
    counts = np.histogram(lengths, bins=[e + 0.5 for e in edges])[0]
    return {f"{a + 1}-{b}": int(c) for a, b, c in zip(edges, edges[1:], counts)}


def sample_rows(cache: TeacherCache, n: int) -> list[dict]:
    """Up to n rows, spread over each set's first shard, with the teacher's prediction and its probability."""
    out, names, sets = [], cache.label_names, cache.sets()
    for set_name in sets:
        info = cache.shards([set_name])[0]
        block = cache.reader(info).read(0, info.rows, ("logits",))
        for i in np.linspace(0, info.rows - 1, min(info.rows, -(-n // len(sets)))).astype(int).tolist():
            logit = block["logits"][i]  # spread over the shard: its rows are in length order
            p = np.exp(logit - logit.max())
            p /= p.sum()
            label = block["label"][i]
            out.append({"row_id": block["row_id"][i], "set": set_name, "text": block["text"][i],
                        "text_b": block["text_b"][i], "label": None if label is None else names[label],
                        "teacher": names[int(p.argmax())], "p": round(float(p.max()), 3),
                        "tokens": block["length"][i]})
    return out[:n]


def inspect(cache_path: str, rows: int = 5, verify: bool = False) -> dict:
    from pipeline.cache_sync import open_cache

    cache = open_cache(cache_path)
    m = cache.manifest
    if verify:
        cache.verify(full=True)
    total_rows = len(cache)
    per_field = field_bytes(cache)
    data = cache.dir / DATA_INFO
    return {
        "cache": str(cache.dir), "schema_version": m.schema_version, "created_by": m.created_by,
        "data_name": m.data_name, "max_length": m.max_length, "label_names": m.label_names,
        "teacher": {k: v for k, v in vars(m.teacher).items() if k != "tokenizer_sha256"},
        "tokenizer": tokenizer_info(cache),
        "layout": vars(m.layout),
        "sets": {name: set_summary(cache, name) for name in cache.sets() if m.sets[name].get("rows")},
        "bytes": {"per_field": per_field, "total": sum(per_field.values()),
                  "per_row": round(sum(per_field.values()) / max(1, total_rows)),
                  "per_row_by_field": {k: round(v / max(1, total_rows)) for k, v in per_field.items()}},
        "data": json.loads(data.read_text()) if data.is_file() else None,
        "verified": "every shard checksummed now" if verify else None,
        "samples": sample_rows(cache, rows),
    }


def report(info: dict) -> str:
    t, lay = info["teacher"], info["layout"]
    tok = info["tokenizer"]
    lines = [f"cache {info['cache']} (schema v{info['schema_version']}, data {info['data_name']!r}, "
             f"max_length {info['max_length']}, labels {', '.join(info['label_names'])})",
             f"teacher: {t['name']} ({t['model_type']}, {t['num_layers']} layers, hidden {t['hidden_size']}, "
             f"{t['num_heads']} heads), weights sha256 {t['weights_sha256'][:12]}, logits from {t['logits_from']}",
             "tokenizer: " + (f"in the cache ({tok['vocab_size']} ids)" if tok["where"] == "cache" else
                              f"{tok['where']} ({tok['vocab_size']} ids)" if tok["where"] else tok["note"]),
             f"layout: cls layers {lay['cls_layers'] or '-'}, hidden layers {lay['hidden_layers'] or '-'}, attention "
             f"layers {lay['attention_layers'] or '-'}, values layer {lay['values_layer'] or '-'}, "
             f"{lay['float_dtype']}, quantize {lay['quantize']}, zarr codec {lay['zarr_codec']}", ""]
    lines += ["| set | rows | shards | tokens | mean len | labels | teacher acc | teacher F1 |",
              "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, s in info["sets"].items():
        labels = ", ".join([f"{k} {v}" for k, v in s["labels"].items() if v]
                           + ([f"unlabelled {s['unlabelled']}"] if s["unlabelled"] else []))
        teacher = s.get("teacher", {})
        lines.append(f"| {name} | {s['rows']:,} | {s['shards']} | {s['tokens']:,} | {s['length']['mean']} | {labels} | "
                     f"{teacher.get('accuracy', '')} | {teacher.get('macro_f1', '')} |")
    lines += ["", "token lengths: " + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in s["length"]["histogram"].items())
                                               for n, s in info["sets"].items())]
    b = info["bytes"]
    lines += ["", f"bytes: {b['total'] / 1e6:.1f} MB, {b['per_row']:,} per row: " + ", ".join(
        f"{k} {v:,}" for k, v in sorted(b["per_row_by_field"].items(), key=lambda kv: -kv[1]))]
    data = info["data"]
    if data:
        q = data.get("quarantined") or {}
        lines.append(f"data: {data.get('rows_in')} rows read from {data.get('source')}, quarantined "
                     + (", ".join(f"{k} {v}" for k, v in q.items()) if q else "none"))
    if info["verified"]:
        lines.append(f"verify: {info['verified']}, all match the manifest")
    lines += ["", "| row | set | text | label | teacher (p) | tokens |", "|---|---|---|---|---|---:|"]
    for r in info["samples"]:
        text = r["text"] + (f" ‖ {r['text_b']}" if r["text_b"] else "")
        text = (text[:77] + "...") if len(text) > 80 else text
        lines.append(f"| {r['row_id']} | {r['set']} | {text.replace('|', '/')} | {r['label'] or ''} | "
                     f"{r['teacher']} ({r['p']}) | {r['tokens']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = CliParser(prog="python -m pipeline.inspect", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="a cache folder (the one holding manifest.json) or a pushed cache's URL")
    p.add_argument("--rows", type=int, default=5, metavar="N", help="sample rows to show (default 5)")
    p.add_argument("--verify", action="store_true", help="checksum every shard against the manifest")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    if a.rows < 0:
        raise UserError(f"--rows {a.rows}: must be 0 or more")
    info = inspect(a.cache, a.rows, a.verify)
    print(json.dumps(info, indent=1, ensure_ascii=False) if a.json else report(info))
    return 0


if __name__ == "__main__":
    run_cli(main)
