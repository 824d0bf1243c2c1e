"""The shard plan: which rows go into which shard, fixed once and shared by every rank.

The plan (plan.arrow: shard, set, row_id) is made from the rows no committed shard holds,
sorted by row id and cut every `shard_rows`, and saved before any shard is written.
A resumed run, or any rank of a torchrun job, loads the same plan instead of re-cutting,
so shard names and contents never depend on timing, crashes or the number of ranks.
Shard i of the plan belongs to rank i % world_size. A file lock serialises planning and
manifest merges between ranks; no process group is needed to write a cache. A second
lock, held for a whole run, keeps any other run (another job, or a single process) out.
"""
from __future__ import annotations

import fcntl
import itertools
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from data.io import UserError, atomic_write_bytes

PLAN = "plan.arrow"
LOCK = ".lock"
RUN_LOCK = ".run.lock"
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


@contextmanager
def run_lock(cache_dir: Path, shared: bool):
    """Held for a whole run: exclusive for one process, shared by the ranks of a torchrun job.

    A second run on the same cache is refused at once (it would write the same shards,
    perhaps with other settings); the ranks of one job coordinate through `cache_lock`.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"cache {cache_dir} is being written by another teacher-cache run (pid {holder}); "
                            "wait for it to finish or use another cache.name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def make_plan(sets: list[tuple[str, pa.Table]], done_ids: dict[str, set[str]], used: dict[str, set[int]],
              shard_rows: int) -> pa.Table:
    """Pending rows of each set, sorted by id, cut into shards named <set>-NNNNN.

    Shards take the indices no committed shard has (`used`): past the end, or the gap a
    repaired shard left, so a repair rewrites the shard under its own name.
    """
    shard, set_col, ids = [], [], []
    for set_name, table in sets:
        done = done_ids.get(set_name, set())
        pending = sorted(r for r in table.column("row_id").to_pylist() if r not in done)
        taken = used.get(set_name, set())
        free = (i for i in itertools.count() if i not in taken)
        for start in range(0, len(pending), shard_rows):
            name = f"{set_name}-{next(free):05d}"
            chunk = pending[start : start + shard_rows]
            shard.extend([name] * len(chunk))
            set_col.extend([set_name] * len(chunk))
            ids.extend(chunk)
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
