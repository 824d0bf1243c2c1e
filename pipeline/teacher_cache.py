"""`python -m pipeline.teacher_cache`: run the teacher once and store what distillation needs.

Rows are planned into shards per set (sorted by row id, `shard_rows` each), so a run
that stops after k committed shards plans the same remaining shards when resumed.
Inside a shard rows are sorted by length (padding only within a batch). The teacher
runs under inference_mode (bf16 autocast on GPU); a writer thread slices per-row
arrays and commits shards while the next batches compute.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from augment.run import UNION
from data.config import parse_cli, save_config
from data.io import (UserError, atomic_replace_dir, atomic_write_text, check_output_dir, pick_device, run_cli,
                     sha256_files)
from data.assets import resolve_model
from data.prepare import ensure_prepared, load_given_logits, load_split
from data.rows import read_rows, table_fingerprint
from pipeline.cache_plan import (cache_lock, clear_plan, load_plan, make_plan, plan_shards, rank_and_world, rows_of,
                                 run_lock, save_plan)
from pipeline.cache_schema import (DATA_INFO, MANIFEST, SHARD_DIR, TOKENIZER_DIR, FieldLayout, Manifest, TeacherInfo, arrow_path,
                                   tokenizer_files)
from pipeline.cache_sync import check_target, push_built
from pipeline.cache_writer import CacheWriter, ShardBuffer
from pipeline.run_config import RunConfig, check_settings, evenly_spaced, parse_layers
from pipeline.teacher import check_config, check_teacher_data, finetune, is_finetuned, load_classifier
from pipeline.teacher_runner import TeacherRunner, WriterThread


def teacher_info(path: Path, model) -> TeacherInfo:
    weights = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    c = model.config
    return TeacherInfo(name=path.name, path=str(path.resolve()), model_type=c.model_type,
                       num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                       num_labels=c.num_labels, weights_sha256=sha256_files(weights),
                       tokenizer_sha256=sha256_files(tokenizer_files(path)))


def save_tokenizer(teacher_dir: Path, cache_dir: Path) -> None:
    """Copy the teacher's tokenizer into the cache (once, atomically): a cache copied elsewhere still says how
    its input_ids were made, and a small-BERT student trained on them tokenises the same way."""
    final = cache_dir / TOKENIZER_DIR
    if final.is_dir():
        return
    tmp = cache_dir / f".{TOKENIZER_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for p in tokenizer_files(teacher_dir):
        shutil.copyfile(p, tmp / p.name)
    atomic_replace_dir(tmp, final)


def resolve_layout(cfg, num_layers: int) -> FieldLayout:
    auto = evenly_spaced(num_layers)
    return FieldLayout(
        cls_layers=parse_layers(cfg.cls_layers, num_layers, auto=list(range(num_layers + 1)), lowest=0,
                                what="cls_layers"),
        hidden_layers=parse_layers(cfg.hidden_layers, num_layers, auto=[0, *auto], lowest=0, what="hidden_layers"),
        attention_layers=parse_layers(cfg.attention_layers, num_layers, auto=auto, lowest=1,
                                      what="attention_layers"),
        values_layer=num_layers if cfg.store_values else None,
        zarr_codec=cfg.zarr_codec,
        quantize=cfg.quantize,
    )


def check_compatible(old: Manifest, new: Manifest, cache_dir: Path) -> None:
    """Refuse to extend a cache made by another teacher, tokenizer, length, layout or data."""
    checks = [
        ("teacher weights", old.teacher.weights_sha256, new.teacher.weights_sha256),
        ("tokenizer", old.teacher.tokenizer_sha256, new.teacher.tokenizer_sha256),
        ("max_length", old.max_length, new.max_length),
        ("label names", old.label_names, new.label_names),
        ("data set", old.data_name, new.data_name),
        # the codec is not compared: every Zarr array names its own, and an extended cache keeps its own
        ("stored layers", replace(old.layout, zarr_codec=""), replace(new.layout, zarr_codec="")),
        ("source of logits", old.teacher.logits_from, new.teacher.logits_from),
    ]
    for what, a, b in checks:
        if a != b:
            raise UserError(f"cache {cache_dir} was built with a different {what} ({_short(a)} vs {_short(b)}); "
                            "use another cache.name or delete the cache")


def _short(x) -> str:
    s = str(x)
    return s[:12] if len(s) == 64 else s[:80]


def gather_sets(run: RunConfig, data_dir: Path) -> list[tuple[str, pa.Table]]:
    """The splits asked for, then every augmented set present (set name aug-<method>). augment.run's
    union.parquet holds the methods' own rows again, so it is left out unless `augment_sets` names it: caching it
    beside them paid the teacher twice for each row, and a student reading every aug-* set saw each row twice."""
    sets = [(split, load_split(data_dir, split)) for split in run.cache.splits]
    aug_dir = Path(run.cache.augment_dir)
    if aug_dir.is_dir() and run.cache.use_augmented:
        for path in sorted(aug_dir.glob("*.parquet")):
            wanted = path.stem in run.cache.augment_sets if run.cache.augment_sets else path.stem != UNION
            if wanted:
                sets.append((f"aug-{path.stem}", read_rows(path)))
    if run.cache.max_rows:
        sets = [(name, t.sort_by("row_id").slice(0, run.cache.max_rows)) for name, t in sets]
    return sets


def cached_ids(cache_dir: Path, manifest: Manifest) -> dict[str, set[str]]:
    """Row ids each set already holds, read from the shards' memory-mapped id columns."""
    done: dict[str, set[str]] = {}
    for s in manifest.shards:
        table = pa.ipc.open_file(pa.memory_map(str(arrow_path(cache_dir, s.name)))).read_all()
        done.setdefault(s.set, set()).update(table.column("row_id").to_pylist())
    return done


def current_plan(writer: CacheWriter, sets: list[tuple[str, pa.Table]], shard_rows: int) -> pa.Table:
    """Under the cache lock: merge committed shards, then the saved plan while it is unfinished,
    else a new plan of the rows no shard holds yet."""
    cache_dir = writer.dir
    with cache_lock(cache_dir):
        writer.manifest = Manifest.load(cache_dir)  # other ranks may have merged since
        writer.merge_records()
        plan = load_plan(cache_dir)
        if plan is not None and not set(plan_shards(plan)) <= set(writer.records()):
            return plan
        clear_plan(cache_dir)
        done = cached_ids(cache_dir, writer.manifest)
        for set_name, table in sets:
            stale = done.get(set_name, set()) - set(table.column("row_id").to_pylist())
            if stale:
                raise UserError(f"cache set {set_name!r} holds {len(stale)} row(s) not in the input "
                                f"(e.g. {min(stale)}): the data changed since the cache was built; use another "
                                "cache.name")
        used: dict[str, set[int]] = {}
        for info in writer.manifest.shards:
            used.setdefault(info.set, set()).add(int(info.name.rsplit("-", 1)[1]))
        plan = make_plan(sets, done, used, shard_rows)
        if plan.num_rows:
            save_plan(cache_dir, plan)
        return plan


def open_cache(run: RunConfig, model, teacher_dir: Path, meta: dict, cache_dir: Path) -> CacheWriter:
    """Create the cache (manifest first) or check that an existing one may be extended.

    A cache that holds no shard yet takes this run's manifest: nothing in it can disagree.
    """
    layout = resolve_layout(run.cache, model.config.num_hidden_layers)
    info = teacher_info(teacher_dir, model)
    if run.cache.logits_from == "data":
        info.logits_from = f"data:{meta['given_logits']['column']}"
    new = Manifest(teacher=info, layout=layout, max_length=run.teacher.max_length,
                   label_names=meta["label_names"], data_name=meta["name"])
    with cache_lock(cache_dir):
        manifest = Manifest.load(cache_dir) if (cache_dir / MANIFEST).is_file() else None
        if manifest is not None and (manifest.shards or any((cache_dir / SHARD_DIR).glob("*.json"))):
            check_compatible(manifest, new, cache_dir)
        else:
            manifest = new
            manifest.save(cache_dir)
        save_tokenizer(teacher_dir, cache_dir)  # also into a cache built before caches carried it
    return CacheWriter(cache_dir, manifest)


def build_cache(run: RunConfig) -> dict:
    """Cache every row of the chosen sets not cached yet; this process's share under torchrun.

    Settings are checked before anything is written; the whole run holds the cache's run
    lock, so a second run on the same cache is refused instead of rewriting its shards.
    """
    rank, world = rank_and_world(run.cache.rank, run.cache.world_size)
    check_settings(run.cache)
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else None
    device = pick_device(run.cache.device, "cache.device", local_rank)
    check_target(run.cache.push_to)  # a missing fsspec backend fails now, not after the teacher ran
    teacher_dir = Path(run.teacher.out_dir)
    fine_tune = not is_finetuned(teacher_dir)
    if fine_tune and run.cache.logits_from == "data":  # the logits are the user's: the encoder only tokenises
        teacher_dir, fine_tune = Path(resolve_model(run.teacher.checkpoint)), False
    check_config(run.teacher, None if fine_tune else teacher_dir)
    cache_dir = Path(run.cache.root) / (run.cache.name or teacher_dir.name)
    check_output_dir(cache_dir, "cache.root")  # a file in the way or a read-only folder: one line, nothing done
    with run_lock(cache_dir, shared=world > 1):
        return _build(run, cache_dir, teacher_dir, fine_tune, device, rank, world)


DATA_FIELDS = ("name", "source", "rows_in", "rows", "quarantined", "unlabelled")  # of meta.json, for pipeline.inspect


def _build(run: RunConfig, cache_dir: Path, teacher_dir: Path, fine_tune: bool, device, rank: int, world: int) -> dict:
    data_dir = Path(run.data.out_dir)
    meta = ensure_prepared(run.data)  # prepared again when its inputs changed, never reused silently
    check_teacher_data(teacher_dir, meta)
    given = load_given_logits(data_dir) if run.cache.logits_from == "data" else None
    if fine_tune:
        print(f"no fine-tuned teacher in {teacher_dir}: fine-tuning {run.teacher.checkpoint} first")
        finetune(run.teacher, str(data_dir))
    model, tokenizer = load_classifier(str(teacher_dir), len(meta["label_names"]))
    model.to(device).eval()
    writer = open_cache(run, model, teacher_dir, meta, cache_dir)
    atomic_write_text(cache_dir / DATA_INFO, json.dumps({k: meta.get(k) for k in DATA_FIELDS}, indent=1))
    sets = gather_sets(run, data_dir)
    writer.set_order = [name for name, _ in sets]
    for name, table in sets if given is not None else ():
        missing = [r for r in table.column("row_id").to_pylist() if r not in given]
        if missing:
            raise UserError(f"cache.logits_from=data: {len(missing)} rows of set {name} have no given logits "
                            f"(e.g. row {missing[0]}); augmented rows carry none: set cache.use_augmented=false")
    with cache_lock(writer.dir):
        for info, problem in writer.repair():
            print(f"repairing shard {info.name}: {problem}; its {info.rows} rows are cached again")
    tables = {name: t for name, t in sets}
    before = {k: len(v) for k, v in cached_ids(writer.dir, Manifest.load(writer.dir)).items()}
    runner = TeacherRunner(model, tokenizer, writer.manifest.layout, run.teacher.max_length, device, run.cache.bf16,
                           given_logits=given)
    bar = tqdm(desc=f"caching {writer.dir.name}" + (f" rank {rank}/{world}" if world > 1 else ""), unit="row",
               smoothing=0.1)
    t0 = time.time()
    pace = Pace(writer, bar)
    try:
        truncated, written, removed = _run_plans(writer, runner, sets, tables, rank, world, run, pace)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # name the cache, not a temp file deep inside a Zarr store
            raise OSError(errno.ENOSPC, "no space left", str(writer.dir)) from None
        raise
    finally:
        bar.close()
    seconds = time.time() - t0
    with cache_lock(writer.dir):
        writer.manifest = Manifest.load(writer.dir)
        writer.merge_records()
        for set_name, table in sets:
            writer.manifest.sets.setdefault(set_name, {"rows": 0})["fingerprint"] = table_fingerprint(table)
        writer.manifest.save(writer.dir)
    if removed:
        print(f"resumed: removed {removed} unfinished shard file(s) of an interrupted run")
    manifest = writer.manifest
    save_config(run, writer.dir, "run_config.json")
    pending = load_plan(writer.dir) is not None
    push_built(run.cache.push_to, writer.dir, pending)  # cache.push_to: upload, manifest last
    return {"cache": str(writer.dir), "rank": rank, "world_size": world,
            "sets": {n: {"rows_in": t.num_rows, "already_cached": before.get(n, 0),
                         "cached_now": manifest.sets.get(n, {}).get("rows", 0)} for n, t in sets},
            "rows_written": written, "truncated": truncated, "seconds": round(seconds, 2),
            "rows_per_s": round(written / seconds, 1) if written else None, "shards": len(manifest.shards),
            "rows_in_cache": sum(s.rows for s in manifest.shards), "plan_pending": pending, **pace.summary()}


class Pace:
    """Where a caching pass's time went: the teacher's forwards vs waiting for the writer to take a batch (the
    progress bar says "writer-bound" while that wait is a tenth of the time or more)."""

    def __init__(self, writer: CacheWriter, bar):
        self.writer, self.bar = writer, bar
        self.teacher_s = self.writer_wait_s = 0.0
        self.t0 = time.perf_counter()

    def written_mb_s(self) -> float:
        return self.writer.profile.bytes / max(1e-9, time.perf_counter() - self.t0) / 1e6

    def shard_done(self, shard_s: float, waited_s: float) -> None:
        self.writer_wait_s += waited_s
        bound = waited_s >= 0.1 * shard_s
        self.bar.set_postfix_str(f"writer-bound, {self.written_mb_s():.0f} MB/s written" if bound else "")

    def summary(self) -> dict:
        return {"teacher_busy_s": round(self.teacher_s, 2), "writer_wait_s": round(self.writer_wait_s, 2),
                "written_mb_s": round(self.written_mb_s(), 1), "write_profile": self.writer.profile.as_dict()}


def _run_plans(writer, runner, sets, tables, rank: int, world: int, run: RunConfig, pace: Pace) -> tuple[int, int, int]:
    """Write this rank's shards of the current plan (then of a next one, while any)."""
    truncated = written = removed = 0
    bar = pace.bar
    while True:
        plan = current_plan(writer, sets, run.cache.shard_rows)
        recorded = set(writer.records())
        mine = [n for i, n in enumerate(plan_shards(plan)) if i % world == rank and n not in recorded]
        if not mine:
            break
        removed += len(writer.remove_unfinished(set(mine)))
        bar.total = (bar.total or 0) + sum(len(rows_of(plan, n)) for n in mine)
        thread = WriterThread(writer, run.cache.writer_queue, merge=world == 1,
                              commit_threads=run.cache.commit_threads)
        thread.start()
        try:
            for name, set_name, table, ids, cut in _prepared(runner, tables, plan, mine):
                t0, waited = time.perf_counter(), thread.waited
                truncated += run_shard(runner, thread, set_name, name, table, ids, cut, run.cache.batch_size, pace)
                written += table.num_rows
                pace.shard_done(time.perf_counter() - t0, thread.waited - waited)
        finally:
            waited = thread.waited
            thread.finish()
            pace.writer_wait_s += thread.waited - waited  # the last shards' commits
    return truncated, written, removed


def _prepared(runner: TeacherRunner, tables: dict[str, pa.Table], plan: pa.Table, names: list[str]):
    """(shard, set, rows, token ids, truncated) per shard; the next shard is tokenised in the background."""
    index: dict[str, dict[str, int]] = {}  # row id -> position, once per set

    def prepare(name: str):
        set_name = name.rsplit("-", 1)[0]
        if set_name not in index:
            index[set_name] = {rid: i for i, rid in enumerate(tables[set_name].column("row_id").to_pylist())}
        where = index[set_name]
        table = tables[set_name].take(pa.array([where[r] for r in rows_of(plan, name)], pa.int64()))
        return (name, set_name, table, *runner.tokenize(table))

    with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
        ahead = pool.submit(prepare, names[0]) if names else None
        for following in [*names[1:], None]:
            item = ahead.result()
            ahead = pool.submit(prepare, following) if following else None
            yield item


ROW_PASSTHROUGH = ["row_id", "split", "source_id", "method", "provenance", "text", "text_b", "label"]


def run_shard(runner: TeacherRunner, thread: WriterThread, set_name: str, shard_name: str, table: pa.Table,
              ids: list[list[int]], truncated: list[bool], batch_size: int, pace: Pace) -> int:
    cols = table.select(ROW_PASSTHROUGH).to_pydict()
    order = np.argsort([len(x) for x in ids], kind="stable")
    buf = ShardBuffer(shard_name, set_name)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size].tolist()
        batch_ids = [ids[i] for i in idx]
        columns = {k: [v[i] for i in idx] for k, v in cols.items()}
        columns.update({"set": [set_name] * len(idx), "length": [len(x) for x in batch_ids],
                        "truncated": [truncated[i] for i in idx], "input_ids": batch_ids})
        t0 = time.perf_counter()
        out = runner.forward(batch_ids)
        pace.teacher_s += time.perf_counter() - t0
        if runner.given_logits is not None:  # cache.logits_from=data: the user's teacher logits replace the head's
            out["logits"] = torch.tensor([runner.given_logits[r] for r in columns["row_id"]], dtype=torch.float32)
        thread.put((buf, columns, out))
        pace.bar.update(len(idx))
    thread.put(("commit", buf))
    return int(sum(truncated))


def main(argv: list[str]) -> int:
    run = parse_cli(RunConfig, argv)
    s = build_cache(run)
    for name, c in s["sets"].items():
        print(f"  {name:>14}: {c['rows_in']} rows in, {c['already_cached']} were cached before, "
              f"{c['cached_now']} cached now")
    who = f" (rank {s['rank']} of {s['world_size']})" if s["world_size"] > 1 else ""
    print(f"cache {s['cache']}: {s['rows_in_cache']} rows in {s['shards']} shards; wrote {s['rows_written']} rows{who} "
          f"({s['truncated']} truncated to max_length) in {s['seconds']} s, {s['rows_per_s']} rows/s"
          + ("; other ranks still have shards to write" if s["plan_pending"] else ""))
    if s["rows_written"]:
        bound = " (writer-bound)" if s["writer_wait_s"] >= 0.1 * s["seconds"] else ""
        print(f"  teacher busy {s['teacher_busy_s']} s, waited for the writer {s['writer_wait_s']} s{bound}; "
              f"wrote {s['written_mb_s']} MB/s")
    return 0


if __name__ == "__main__":
    run_cli(main)
