"""The shard plan: which rows go into which shard, fixed once and shared by every rank.

The plan (plan.arrow: shard, set, row_id) is made from the rows no committed shard holds,
sorted by row id and cut every `shard_rows`, and saved before any shard is written.
A resumed run, or any rank of a torchrun job, loads the same plan instead of re-cutting,
so shard names and contents never depend on timing, crashes or the number of ranks.
Shard i of the plan belongs to rank i % world_size. A file lock serialises planning and
manifest merges between ranks; no process group is needed to write a cache.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from data.io import UserError, atomic_write_bytes

PLAN = "plan.arrow"
LOCK = ".lock"
PLAN_SCHEMA = pa.schema([("shard", pa.string()), ("set", pa.string()), ("row_id", pa.string())])


@contextmanager
def cache_lock(cache_dir: Path):
    """Exclusive lock on the cache folder (planning, merging the manifest)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_plan(sets: list[tuple[str, pa.Table]], done_ids: dict[str, set[str]], next_index: dict[str, int],
              shard_rows: int) -> pa.Table:
    """Pending rows of each set, sorted by id, cut into shards named <set>-NNNNN."""
    shard, set_col, ids = [], [], []
    for set_name, table in sets:
        done = done_ids.get(set_name, set())
        pending = sorted(r for r in table.column("row_id").to_pylist() if r not in done)
        start = next_index.get(set_name, 0)
        for i, rid in enumerate(pending):
            shard.append(f"{set_name}-{start + i // shard_rows:05d}")
            set_col.append(set_name)
            ids.append(rid)
    return pa.Table.from_pydict({"shard": shard, "set": set_col, "row_id": ids}, schema=PLAN_SCHEMA)


def save_plan(cache_dir: Path, plan: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, PLAN_SCHEMA) as w:
        w.write_table(plan)
    atomic_write_bytes(cache_dir / PLAN, sink.getvalue().to_pybytes())


def load_plan(cache_dir: Path) -> pa.Table | None:
    path = cache_dir / PLAN
    if not path.is_file():
        return None
    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{path}: damaged shard plan ({e}); delete it to re-plan the unwritten rows") from None


def clear_plan(cache_dir: Path) -> None:
    (cache_dir / PLAN).unlink(missing_ok=True)


def plan_shards(plan: pa.Table) -> list[str]:
    """Shard names in plan order."""
    return list(dict.fromkeys(plan.column("shard").to_pylist()))


def rows_of(plan: pa.Table, shard: str) -> list[str]:
    return plan.filter(pc.equal(plan.column("shard"), shard)).column("row_id").to_pylist()


def rank_and_world(rank: int, world: int) -> tuple[int, int]:
    """Config values win; else torchrun's RANK/WORLD_SIZE; else a single process."""
    if world <= 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if rank < 0:
        rank = int(os.environ.get("RANK", "0"))
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} outside world size {world}")
    return rank, world
