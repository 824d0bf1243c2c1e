"""Copy a teacher cache to and from any fsspec URL: `python -m pipeline.cache_sync push DIR URL | pull URL DIR`.

Caches are written locally (the writer needs atomic renames and flock). `push` uploads each
committed shard's files, then its record shards/<name>.json (a matching remote record skips the
shard but for missing files, so an interrupted push resumes), and manifest.json LAST in one PUT:
the remote commit point. `pull` fetches what the local mirror lacks or has damaged, verifies each
shard against the manifest before renaming it into place, and writes the local manifest last.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from data.io import (UserError, atomic_replace_dir, atomic_write_bytes, atomic_write_text, fsync_dir, run_cli,
                     sha256_file, sha256_files, sha256_tree)
from pipeline.cache_plan import cache_lock
from pipeline.cache_reader import Stamp, TeacherCache, stat_digest
from pipeline.cache_schema import (MANIFEST, SHARD_DIR, TOKENIZER_DIR, TOKENIZER_FILES, Manifest, ShardInfo, arrow_path,
                                   record_path, tokenizer_files, zarr_path)

TMP = ".partial"


def remote(url: str, **storage_options):
    """(filesystem, root) of a URL; an unknown scheme or missing backend is one line."""
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as e:
        raise UserError(f"{url}: cannot open this storage ({e}); install its fsspec backend (s3fs, gcsfs...)") from None
    return fs, root.rstrip("/")


def _files(cache_dir: Path, info: ShardInfo) -> dict[str, Path]:
    """Remote name (relative to the cache root) -> local file, for one shard's data."""
    out = {f"{SHARD_DIR}/{info.name}.arrow": arrow_path(cache_dir, info.name)}
    if info.zarr_sha256:
        z = zarr_path(cache_dir, info.name)
        out.update({f"{SHARD_DIR}/{info.name}.zarr/{p.relative_to(z).as_posix()}": p
                    for p in sorted(z.rglob("*")) if p.is_file()})
    return out


def _cat(fs, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _put_bytes(fs, path: str, data: bytes) -> None:
    """One whole-object write: a PUT on object stores, temp file + rename on a local disk."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def push(cache_dir, url: str, **storage_options) -> dict:
    """Upload the committed shards the remote lacks, then the manifest (the remote commit point)."""
    cache_dir = Path(cache_dir)
    Manifest.load(cache_dir)  # refuses a folder that is not a cache
    text = (cache_dir / MANIFEST).read_bytes()  # one snapshot: the shards it lists are committed and immutable
    manifest = Manifest.from_json(text.decode(), str(cache_dir / MANIFEST))
    fs, root = remote(url, **storage_options)
    have = {p[len(root) + 1:]: d.get("size") for p, d in fs.find(f"{root}/{SHARD_DIR}", detail=True).items()}
    stats, dirs, stamp = {"shards": 0, "files": 0, "bytes": 0, "manifest": False}, set(), Stamp(cache_dir)
    for info in manifest.shards:
        files, rec = _files(cache_dir, info), f"{SHARD_DIR}/{info.name}.json"
        try:
            committed = rec in have and json.loads(_cat(fs, f"{root}/{rec}") or "{}") == asdict(info)
        except ValueError:  # a damaged remote record: upload the shard again
            committed = False
        todo = {r: p for r, p in files.items() if not committed or have.get(r) != p.stat().st_size}
        if not todo:
            continue
        if stamp.check(info):
            raise UserError(f"shard {info.name}: local files in {cache_dir} do not match their checksums; not pushed")
        if not committed:  # a stale record must not vouch for new files; drop files the shard no longer has
            stale = f"{SHARD_DIR}/{info.name}.zarr/"
            for r in [r for r in have if r == rec or (r.startswith(stale) and r not in files)]:
                fs.rm_file(f"{root}/{r}")
        for d in sorted({posixpath.dirname(f"{root}/{r}") for r in todo} - dirs):
            fs.makedirs(d, exist_ok=True)  # (a no-op on object stores)
            dirs.add(d)
        fs.put([str(p) for p in todo.values()], [f"{root}/{r}" for r in todo])  # concurrent on async backends
        stats["files"] += len(todo)
        stats["bytes"] += sum(p.stat().st_size for p in todo.values())
        if not committed:
            _put_bytes(fs, f"{root}/{rec}", json.dumps(asdict(info)).encode())
            stats["files"] += 1
        stats["shards"] += 1
    stamp.save(manifest)
    for path in tokenizer_files(cache_dir / TOKENIZER_DIR) if (cache_dir / TOKENIZER_DIR).is_dir() else ():
        data = path.read_bytes()  # a few small files: compared whole
        if _cat(fs, f"{root}/{TOKENIZER_DIR}/{path.name}") != data:
            _put_bytes(fs, f"{root}/{TOKENIZER_DIR}/{path.name}", data)
            stats["files"] += 1
    if _cat(fs, f"{root}/{MANIFEST}") != text:
        _put_bytes(fs, f"{root}/{MANIFEST}", text)
        stats["manifest"] = True
    return stats


def _download(fs, root: str, url: str, local: Path, info: ShardInfo) -> int:
    """Fetch one shard under temp names, verify it, then rename it into place; returns bytes."""
    a_final, z_final = arrow_path(local, info.name), zarr_path(local, info.name)
    a_tmp, z_tmp = a_final.with_name(a_final.name + TMP), z_final.with_name(z_final.name + TMP)
    prefix = f"{root}/{SHARD_DIR}/{info.name}.zarr"
    try:
        shutil.rmtree(z_tmp, ignore_errors=True)
        todo = {f"{root}/{SHARD_DIR}/{info.name}.arrow": a_tmp}
        todo.update({p: z_tmp / p[len(prefix) + 1:] for p in (fs.find(prefix) if info.zarr_sha256 else [])})
        for d in {p.parent for p in todo.values()}:
            d.mkdir(parents=True, exist_ok=True)
        fs.get(list(todo), [str(p) for p in todo.values()])  # concurrent on async backends
        bad = ("Arrow file" if sha256_file(a_tmp) != info.arrow_sha256 else "Zarr folder"
               if info.zarr_sha256 and (not z_tmp.is_dir() or sha256_tree(z_tmp) != info.zarr_sha256) else None)
        if bad:
            raise UserError(f"shard {info.name}: {bad} in {url} does not match the manifest checksum "
                            "(damaged or changed after the push); nothing of it was installed")
        size = a_tmp.stat().st_size + sum(p.stat().st_size for p in z_tmp.rglob("*") if p.is_file())
        record_path(local, info.name).unlink(missing_ok=True)
        if info.zarr_sha256:
            atomic_replace_dir(z_tmp, z_final)
        a_tmp.replace(a_final)
        fsync_dir(a_final.parent)
        atomic_write_text(record_path(local, info.name), json.dumps(asdict(info)))
        return size
    except FileNotFoundError as e:
        raise UserError(f"shard {info.name}: {e.filename or e} missing in {url}; re-run the push") from None
    finally:
        a_tmp.unlink(missing_ok=True)
        shutil.rmtree(z_tmp, ignore_errors=True)


def _pull_tokenizer(fs, root: str, url: str, local: Path, manifest: Manifest) -> None:
    """The teacher's tokenizer folder, when the remote has one and the local copy is missing or differs; checked
    against the manifest before it is moved into place."""
    final, want = local / TOKENIZER_DIR, manifest.teacher.tokenizer_sha256
    if final.is_dir() and tokenizer_files(final) and sha256_files(tokenizer_files(final)) == want:
        return
    remote_files = [p for p in fs.find(f"{root}/{TOKENIZER_DIR}") if posixpath.basename(p) in TOKENIZER_FILES]
    if not remote_files:
        return  # pushed before caches carried their tokenizer
    tmp = local / f".{TOKENIZER_DIR}{TMP}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for p in remote_files:
            (tmp / posixpath.basename(p)).write_bytes(fs.cat_file(p))
        if sha256_files(tokenizer_files(tmp)) != want:
            raise UserError(f"{url}/{TOKENIZER_DIR}: does not match the manifest's tokenizer checksum; not installed")
        atomic_replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pull(url: str, local_dir, **storage_options) -> dict:
    """Mirror a pushed cache: only shards missing or damaged locally are fetched; the manifest last."""
    fs, root = remote(url, **storage_options)
    if (text := _cat(fs, f"{root}/{MANIFEST}")) is None:
        raise UserError(f"{url}: no {MANIFEST}; no cache was pushed there (python -m pipeline.cache_sync push)")
    manifest = Manifest.from_json(text.decode(), f"{url}/{MANIFEST}")
    local, stats = Path(local_dir), {"shards": 0, "bytes": 0, "kept": 0}
    with cache_lock(local):  # ranks of one job pulling into one mirror take turns
        (local / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        stamp = Stamp(local)  # a shard unchanged since it was last verified is not read again
        for info in manifest.shards:
            if stamp.check(info) is None:
                stats["kept"] += 1
            else:
                stats["bytes"] += _download(fs, root, url, local, info)  # checksummed before it is installed
                stamp.shards[info.name] = stat_digest(local, info.name)
                stats["shards"] += 1
        stamp.save(manifest)
        _pull_tokenizer(fs, root, url, local, manifest)
        atomic_write_bytes(local / MANIFEST, text)
    return stats


def mirror_dir(url: str) -> Path:
    home = os.environ.get("DISTIL_CACHE_HOME") or "~/.cache/distil-cache"
    return Path(home).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16]


def local_cache_path(path_or_url, local_dir=None, **storage_options) -> Path:
    """A local folder holding the cache: the path itself, or a verified mirror of a remote URL."""
    s = str(path_or_url)
    scheme = s.split("://", 1)[0] if "://" in s else ""
    if scheme in ("", "file", "local"):
        return Path(remote(s)[1]) if scheme else Path(s)
    local = Path(local_dir) if local_dir else mirror_dir(s)
    st = pull(s, local, **storage_options)
    if st["shards"]:
        print(_line("pulled", st, f"of {s} into {local}"))
    return local


def open_cache(path_or_url, local_dir=None, **storage_options) -> TeacherCache:
    return TeacherCache(local_cache_path(path_or_url, local_dir, **storage_options))


def check_target(url: str) -> None:
    """cache.push_to: fail before the teacher runs when the URL's backend is missing."""
    if url:
        remote(url)


def _line(verb: str, s: dict, where: str) -> str:
    return (f"{verb} {s['shards']} shard(s), {s['bytes'] / 1e6:.1f} MB, {where}"
            + (f"; {s['kept']} already there" if "kept" in s else "" if s["manifest"] else "; remote was up to date"))


def push_built(url: str, cache_dir: Path, pending: bool) -> None:
    """cache.push_to after a build: the process that finishes the cache pushes it, under the cache lock."""
    if url and pending:
        print(f"not pushing to {url}: other ranks still have shards to write (the rank that finishes pushes)")
    elif url:
        try:
            with cache_lock(cache_dir):
                s = push(cache_dir, url)
        except (UserError, OSError) as e:
            raise UserError(f"cache {cache_dir} is complete, but pushing it to {url} failed ({e}); resume with "
                            f"`python -m pipeline.cache_sync push {cache_dir} {url}`") from None
        print(_line("pushed", s, f"of {cache_dir} to {url}"))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.cache_sync", description=__doc__.split("\n")[0])
    p.add_argument("cmd", choices=["push", "pull"])
    p.add_argument("src", help="push: the local cache folder; pull: the URL")
    p.add_argument("dst", help="push: the URL; pull: the local folder")
    a = p.parse_args(argv)
    s = (push if a.cmd == "push" else pull)(a.src, a.dst)
    print(_line(f"{a.cmd}ed", s, f"{a.src} -> {a.dst}"))
    return 0


if __name__ == "__main__":
    run_cli(main)
