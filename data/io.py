"""Small helpers every stage shares: atomic writes, checksums, the device picker, one-line CLI errors."""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable

from data.faults import crash_point


class UserError(Exception):
    """Bad input or a refused operation: printed as one line, exit code 2."""


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("atomic-write-before-rename")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place (the final name must not exist yet)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def check_output_dir(path: str | os.PathLike, setting: str) -> None:
    """Refuse an output folder that is a file or cannot be written, before any work (creates nothing):
    the nearest existing folder on its path must take a file."""
    path = existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{setting}={path}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        raise UserError(f"{setting}={path}: cannot write in {existing} ({e.strerror})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths) -> str:
    """One checksum of several files' contents, concatenated in sorted path order (names not included)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike) -> str:
    """Checksum of a folder: relative names and contents of every file, in sorted order."""
    root = Path(root)
    return tree_digest({p.relative_to(root): sha256_file(p) for p in root.rglob("*") if p.is_file()})


def tree_digest(file_digests: dict[PurePosixPath | Path, str]) -> str:
    """sha256_tree from each file's relative path and sha256, for a writer that hashed the bytes it wrote."""
    h = hashlib.sha256()
    for rel in sorted(file_digests, key=PurePosixPath):
        h.update(PurePosixPath(rel).as_posix().encode())
        h.update(b"\0")
        h.update(file_digests[rel].encode())
    return h.hexdigest()


def pick_device(name: str, setting: str = "device", local_rank: int | None = None):
    """Every stage's one checked device picker (torch is imported only here): a bad name or a missing GPU is
    one line naming the setting, before anything is written (not torch's AssertionError at the first
    forward). `local_rank` picks a torchrun rank's own GPU when the setting names none."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if gpus else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"{setting}: {name!r} is not auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is None and local_rank is not None and gpus:
        device = torch.device("cuda", local_rank % gpus)
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise UserError(f"{setting}={name} asked for, but {gpus or 'no'} CUDA GPU(s) are visible; use auto or cpu")
    return device


def quiet_transformers() -> None:
    """Load reports and weight-loading bars are noise in a CLI that loads a model (every stage loads one)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class Interrupted(KeyboardInterrupt):
    """SIGTERM as an exception, so the same clean-up as Ctrl-C runs (exit 128 + signal number)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


class CliParser(argparse.ArgumentParser):
    """argparse for the commands that take positional arguments: a usage error is one line, exit 2 (run_cli)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run an entry point; known failures become one line on stderr and exit code 2, 3, 130 or 143."""
    from data.config import ConfigError

    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print("interrupted: committed work is kept; run the same command again to resume", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(f"\nerror: disk full while writing {e.filename or 'the output'}: the previous state is intact "
                  "(committed work is kept; free space and run the same command to resume)", file=sys.stderr)
            sys.exit(3)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = (e.strerror or "permission denied").lower()
            print(f"error: {e.filename or 'a file'}: {reason}; check the folder's permissions or choose another "
                  "output folder", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code or 0)
