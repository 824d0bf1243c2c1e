"""`python -m augment.run [--config configs/augment.yaml] key=value ...`

Augments one split of a prepared row folder with each method in `methods`; each writes
out_dir/<method>.parquet (ROW_SCHEMA, label null) and <method>.summary.json. With two or
more methods, union.parquet holds their rows together (a text that two methods both
produced for the same source row is kept once, from the first method).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from augment.config import AugmentConfig, method_params
from augment.parts import combine_tables, run_method, stable_key
from data.config import parse_cli, save_config
from data.io import UserError, atomic_write_text, run_cli
from data.prepare import load_split

UNION = "union"  # out_dir/union.parquet: every method's rows together (the teacher cache leaves it out by default)


def load_input(cfg: AugmentConfig) -> pa.Table:
    rows = load_split(cfg.data_dir, cfg.split)
    if rows.num_rows == 0:
        raise UserError(f"{cfg.data_dir}/{cfg.split}.parquet has no rows to augment")
    return rows.slice(0, cfg.max_rows) if cfg.max_rows else rows


def make_augmenter(cfg: AugmentConfig, method: str):
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - progress notes stay off stdout
    if method == "tang":
        from augment.tang import TangAugmenter

        return TangAugmenter(cfg.tang, cfg.seed, cfg.cache_dir, cfg.workers)
    from augment.tinybert import TinyBertAugmenter

    return TinyBertAugmenter(cfg.tinybert, cfg.seed, cfg.cache_dir, cfg.data_dir, log=log)


def write_union(summaries: list[dict], out_dir: Path) -> dict:
    """All methods' rows, chunk by chunk (bounded memory), a row id kept once."""
    files = [pq.ParquetFile(s["output"]) for s in summaries]
    group = [0] * len(files)
    dropped = 0

    def chunks():
        nonlocal dropped
        for c in range(len(summaries[0]["rows_out_per_chunk"])):
            seen, parts = set(), []
            for m, s in enumerate(summaries):
                if not s["rows_out_per_chunk"][c]:
                    continue
                t = files[m].read_row_group(group[m])
                group[m] += 1
                ids = t.column("row_id").to_pylist()
                keep = [r not in seen for r in ids]
                seen.update(ids)
                dropped += keep.count(False)
                parts.append(t.filter(pa.array(keep)))
            if parts:
                yield pa.concat_tables(parts)

    out = out_dir / f"{UNION}.parquet"
    total = combine_tables(chunks(), out)
    summary = {"method": UNION, "methods": [s["method"] for s in summaries], "rows_out": total,
               "duplicates_dropped": dropped, "run_key": stable_key([s["run_key"] for s in summaries]),
               "output": str(out)}
    atomic_write_text(out_dir / f"{UNION}.summary.json", json.dumps(summary, indent=2))
    return summary


def drop_stale_union(out_dir: Path, method: str) -> None:
    """A union built from an earlier output of `method` no longer matches it: remove it."""
    path = out_dir / f"{UNION}.summary.json"
    if path.is_file() and method in json.loads(path.read_text()).get("methods", []):
        (out_dir / f"{UNION}.parquet").unlink(missing_ok=True)
        path.unlink()


def augment(cfg: AugmentConfig) -> list[dict]:
    rows = load_input(cfg)
    out_dir = Path(cfg.out_dir)
    summaries = []
    for method in cfg.methods:
        aug = make_augmenter(cfg, method)
        summaries.append(run_method(aug, rows, out_dir=out_dir, params=method_params(cfg, method), seed=cfg.seed,
                                    chunk_rows=cfg.chunk_rows, workers=cfg.workers, progress=cfg.progress))
    if len(summaries) > 1:
        summaries.append(write_union(summaries, out_dir))
    elif not summaries[0].get("reused"):
        drop_stale_union(out_dir, cfg.methods[0])
    save_config(cfg, out_dir, "augment_config.json")
    return summaries


def describe(s: dict) -> str:
    if s["method"] == UNION:
        return f"union: {s['rows_out']} rows ({s['duplicates_dropped']} shared by methods) -> {s['output']}"
    skipped = sum(s["skipped"].values())
    why = f" {s['skipped']}" if skipped else ""
    again = " (unchanged, reused)" if s.get("reused") else ""
    return (f"{s['method']}: {s['rows_in']} rows in -> {s['rows_out']} out, {s['duplicates_dropped']} duplicates "
            f"dropped, {skipped} skipped{why}{again} -> {s['output']}")


def main(argv: list[str]) -> int:
    cfg = parse_cli(AugmentConfig, argv)
    for s in augment(cfg):
        print(describe(s))
    return 0


if __name__ == "__main__":
    run_cli(main)
