"""Shard bytes to disk: hashed from memory as they are written, flushed once per shard, timed per step.

The writer builds every file of a shard in memory (Arrow IPC bytes, Zarr chunks already compressed), so the
checksums the manifest records are taken from those bytes instead of reading the files back, and the shard's
files are fsynced together after the last write instead of one flush between files.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from data.io import fsync_dir

# Linux starts writing a file's dirty pages back when told its cache pages are not needed (and drops them once
# clean: a cache is read by later runs, not by this one). None where the call does not exist.
START_WRITEBACK = getattr(os, "POSIX_FADV_DONTNEED", None) if sys.platform.startswith("linux") else None
_HASHERS = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="shard-hash")
STEPS = ("add", "encode", "compress", "hash", "write", "fsync", "record")


class WriteProfile:
    """Seconds per step of writing, summed over the writer's threads, and the bytes that reached the disk.

    add: a teacher batch joins its shard (after its device->host copy); encode: the Arrow table and its IPC bytes,
    joining a Zarr array's blocks; compress: Zarr chunks encoded in memory; write, fsync: the files; hash: the
    checksums' time beyond the writes and the fsync they run beside;
    record: the shard's commit record and the manifest merge."""

    def __init__(self):
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.bytes = 0
        self._lock = threading.Lock()

    @contextmanager
    def step(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] += time.perf_counter() - t0

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


class ShardFiles:
    """Files of one shard under `root`: `write` writes each one while another thread hashes the same bytes,
    `flush` fsyncs them all and every folder made under root, then collects the checksums (so hashing
    overlaps the later writes and the fsync instead of following each write)."""

    PENDING_BYTES = 256 << 20  # bytes whose hash is still running (each holds its buffer): write waits above this

    def __init__(self, root: Path, profile: WriteProfile):
        self.root, self.profile = Path(root), profile
        self.digests: dict[Path, str] = {}  # relative path -> sha256, once collected
        self._hashing: dict[Path, tuple[Future, int]] = {}  # relative path -> (its hash, its size)
        self._dirs: set[Path] = {self.root}

    def write(self, rel: str | Path, data) -> None:
        """Write one file; the disk starts taking it at once (the shard's final fsync then has little left to
        wait for, and the next file's encoding overlaps this one's transfer)."""
        path = self.root / rel
        view = memoryview(data).cast("B")
        size = view.nbytes
        hashed = _HASHERS.submit(hashlib.sha256, view)  # beside the write: both leave the GIL
        with self.profile.step("write"):
            if path.parent not in self._dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._dirs.update(p for p in path.parents if p.is_relative_to(self.root))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                while view:
                    view = view[os.write(fd, view):]
                if START_WRITEBACK is not None:
                    os.posix_fadvise(fd, 0, 0, START_WRITEBACK)
            finally:
                os.close(fd)  # a shard has hundreds of chunk files: none stays open until the flush
        self.profile.add_bytes(size)
        self.digests.pop(Path(rel), None)  # a file written again (zarr.json) is hashed again
        self._hashing[Path(rel)] = (hashed, size)
        self._collect(self.PENDING_BYTES)

    def _collect(self, limit: int) -> None:
        """Checksums of finished hashes, oldest first; waits only while more than `limit` bytes are in flight."""
        with self.profile.step("hash"):
            pending = sum(size for _, size in self._hashing.values())
            for rel, (hashed, size) in list(self._hashing.items()):
                if pending <= limit and not hashed.done():
                    break
                self.digests[rel] = hashed.result().hexdigest()
                del self._hashing[rel]
                pending -= size

    def flush(self) -> None:
        """Make every file written so far durable (data, and the entries of the folders made under root), then
        collect its checksum. Root's own entries are the caller's: it renames the files into place there and
        fsyncs root once after that."""
        with self.profile.step("fsync"):
            for rel in [*self.digests, *self._hashing]:
                fd = os.open(self.root / rel, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for folder in sorted(self._dirs - {self.root}, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(folder)
        self._collect(0)

    def digests_under(self, folder: str) -> dict[Path, str]:
        """Digests of the files under `folder` (relative to root), relative to that folder (tree_digest's input)."""
        return {p.relative_to(folder): d for p, d in self.digests.items() if p.is_relative_to(folder)}
