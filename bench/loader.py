"""Benchmark the training stream (issue 12): loader overhead beside the same batches in RAM, loader and reader
throughput, single-row lookups, and the Zarr token fields.

Side by side in one run, on a cache of the first `rows` train rows (logits + [CLS]) built by the real pipeline:
  - loader overhead: a BiLSTM + Hinton-loss step (batch 64) fed from CacheStream vs the very same batches held
    in RAM (medians of interleaved repeats);
  - the loader without a student: with the word ids, without them, and with a per-batch tokenisation; a fresh
    stream's first epoch (reads its window) beside later epochs (reuse it);
  - raw ShardReader.columns throughput (random and sequential blocks), TeacherCache.lookup per row;
  - a small full cache (hidden, attention, values): ShardReader block reads and the stream's padded batches.
Writes bench/results/loader.json (or out=) and prints it.

    python bench/loader.py [rows=2000] [repeats=3] [loader_passes=50] [key=value ...]     (RunConfig overrides as in bench/student.py)
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

from stage_two import (LOGITS_CLS, REPO, ZARR, Setting, Step, cache_pass, make_student, median,  # noqa: E402
                       write_results)
from pipeline.cache_reader import TeacherCache  # noqa: E402
from trainer.loader import CacheStream, StreamConfig  # noqa: E402
from trainer.students import text_encoder  # noqa: E402

DEFAULTS = {"repeats": "3", "loader_passes": "50", "reads": "40", "lookups": "300", "zarr_rows": "512", "profile": "0",
            "out": str(REPO / "bench/results/loader.json")}
TARGETS = {"loader_overhead": "<= 0.05 ((t_stream - t_ram) / t_ram, medians of the repeats, BiLSTM + hinton, batch 64)",
           "reader_logits_cls_rows_s": ">= 50000 (2 CPU cores)",
           "loader_rows_s_with_word_ids": ">= 500000 (logits + cls + word ids, no student)",
           "token_fields_rows_s": ">= 20000 (hidden, attention: ShardReader.columns, 128-row blocks; the stream's "
                                  "padded batches are reported beside)"}


def loader_overhead(cache_dir: Path, texts: list[str], num_labels: int, opts: dict, device) -> dict:
    """Same BiLSTM + hinton steps fed by CacheStream vs by the same batches pre-collated in RAM."""
    bs, seed, repeats = int(opts["batch"]), int(opts["seed"]), int(opts["repeats"])
    model = make_student("bilstm", texts, num_labels, seed)
    t0 = time.perf_counter()
    words = text_encoder(model, TeacherCache(cache_dir), ["train"])  # word ids tokenised once per run
    words_s = time.perf_counter() - t0
    stream = CacheStream(cache_dir, ["train"], ("cls", "logits"), StreamConfig(batch_size=bs, seed=seed), encode=words)
    stream.set_epoch(0)
    ram = [b for b in stream]
    for b in ram:
        b.pop("stream")
    n = len(ram)
    step = Step(model, "hinton", total_steps=n * (2 * repeats + 1), device=device)
    for b in ram[: min(3, n)]:  # warm-up (allocator, LSTM kernels)
        step(b)
    t_stream, t_ram = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stream.set_epoch(0)
        for b in stream:
            b.pop("stream")
            step(b)
        t_stream.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in ram:
            step(b)
        t_ram.append(time.perf_counter() - t0)
    ts, tr = min(t_stream), min(t_ram)  # best of the interleaved repeats (the target reads the medians)
    # the loader alone (no student): with the word ids, without (reader + window + batches only), and with the
    # per-batch tokenisation a student's own encode_texts takes
    loader_s, plain_s, per_batch_s = [], [], []
    first = CacheStream(cache_dir, ["train"], ("cls", "logits"), StreamConfig(batch_size=bs, seed=seed), encode=words)
    t0 = time.perf_counter()
    for _b in first:  # a fresh stream's first epoch reads its window; later epochs reuse it (the medians below)
        pass
    first_s = time.perf_counter() - t0
    plain = CacheStream(cache_dir, ["train"], ("cls", "logits"), StreamConfig(batch_size=bs, seed=seed))
    per_batch = CacheStream(cache_dir, ["train"], ("cls", "logits"), StreamConfig(batch_size=bs, seed=seed),
                            encode=model.encode_texts)
    passes = int(opts["loader_passes"])  # an epoch of 2,000 rows takes ~4 ms: one is too short to time
    for _ in range(repeats):
        for s, acc, k in ((stream, loader_s, passes), (plain, plain_s, passes), (per_batch, per_batch_s, 1)):
            s.set_epoch(0)
            t0 = time.perf_counter()
            for _pass in range(k):
                for _b in s:
                    pass
            acc.append((time.perf_counter() - t0) / k)
    return {"student": "bilstm", "loss": "hinton", "fields": ["logits", "cls"], "batch_size": bs, "steps": n,
            "rows": stream.num_rows, "repeats": repeats,
            "stream_seconds": [round(t, 3) for t in t_stream], "ram_seconds": [round(t, 3) for t in t_ram],
            "stream_steps_s": round(n / ts, 2), "ram_steps_s": round(n / tr, 2),
            "overhead": round((ts - tr) / tr, 4),
            "overhead_median": round((median(t_stream) - median(t_ram)) / median(t_ram), 4),
            "step_ms_ram": round(1000 * tr / n, 2),
            "loader_ms_per_batch_with_word_ids": round(1000 * median(loader_s) / n, 3),
            "loader_ms_per_batch_no_words": round(1000 * median(plain_s) / n, 3),
            "loader_rows_s_no_words": round(stream.num_rows / median(plain_s)),
            "loader_rows_s_with_word_ids": round(stream.num_rows / median(loader_s)),
            "loader_rows_s_with_word_ids_first_epoch": round(stream.num_rows / first_s),
            "loader_rows_s_tokenising_per_batch": round(stream.num_rows / median(per_batch_s)),
            "word_ids_once_seconds": round(words_s, 3), "word_ids_once_rows_s": round(stream.num_rows / words_s)}


def token_fields_throughput(cache_dir: Path, field: str, opts: dict) -> dict:
    """Rows/s of the training stream with a token-level field (batches padded as a student gets them)."""
    stream = CacheStream(cache_dir, ["train"], ("logits", field), StreamConfig(batch_size=int(opts["batch"])))
    seconds = []
    for epoch in range(int(opts["repeats"])):
        stream.set_epoch(epoch)
        t0 = time.perf_counter()
        for _b in stream:
            pass
        seconds.append(time.perf_counter() - t0)
    return {"stream_rows_s": round(stream.num_rows / median(seconds)), "rows": stream.num_rows}


def reader_throughput(cache_dir: Path, fields: tuple, opts: dict, block: int = 512, reads: int | None = None) -> dict:
    """Rows/s of ShardReader.columns (the arrays the training stream slices): random blocks (random shard,
    random start) and a sequential pass."""
    cache = TeacherCache(cache_dir)
    shards = cache.shards()
    rng = np.random.default_rng(int(opts["seed"]))
    reads = reads or int(opts["reads"])
    for s in shards:  # warm: map the Arrow files, open Zarr groups
        cache.reader(s).columns(0, min(block, s.rows), fields)
    rows, t0 = 0, time.perf_counter()
    for _ in range(reads):
        s = shards[rng.integers(len(shards))]
        start = int(rng.integers(0, max(1, s.rows - block + 1)))
        rows += cache.reader(s).columns(start, start + block, fields).n
    random_s = time.perf_counter() - t0
    seq_rows, t0 = 0, time.perf_counter()
    while seq_rows < rows or seq_rows == 0:  # at least as many rows as the random reads, whole passes
        for s in shards:
            for start in range(0, s.rows, block):
                seq_rows += cache.reader(s).columns(start, start + block, fields).n
    seq_s = time.perf_counter() - t0
    return {"fields": list(fields), "block_rows": block, "shards": len(shards), "cache_rows": len(cache),
            "random_reads": reads, "random_rows_s": round(rows / random_s),
            "sequential_rows_s": round(seq_rows / seq_s)}


def lookup_throughput(cache_dir: Path, opts: dict) -> dict:
    cache = TeacherCache(cache_dir)
    t0 = time.perf_counter()
    ids = cache.row_table(columns=["row_id"]).column("row_id").to_pylist()
    cache.lookup(ids[0], ("logits", "cls"))  # builds the row-id index
    index_s = time.perf_counter() - t0
    rng = np.random.default_rng(int(opts["seed"]))
    chosen = [ids[i] for i in rng.integers(0, len(ids), int(opts["lookups"]))]
    t0 = time.perf_counter()
    for rid in chosen:
        cache.lookup(rid, ("logits", "cls"))
    seconds = time.perf_counter() - t0
    return {"fields": ["logits", "cls"], "lookups": len(chosen), "rows_s": round(len(chosen) / seconds),
            "us_per_row": round(1e6 * seconds / len(chosen), 1), "index_build_seconds": round(index_s, 3)}


def profile_loader(cache_dir: Path, opts: dict, top: int = 18) -> str:
    stream = CacheStream(cache_dir, ["train"], ("cls", "logits"), StreamConfig(batch_size=int(opts["batch"])))
    prof = cProfile.Profile()
    prof.enable()
    for epoch in range(3):
        stream.set_epoch(epoch)
        for _b in stream:
            pass
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def part_loader(opts, rest, teacher: Path, cache_dir: Path, texts, num_labels, device, tmp: Path) -> dict:
    res = {"overhead": loader_overhead(cache_dir, texts, num_labels, opts, device),
           "reader_logits_cls": reader_throughput(cache_dir, ("logits", "cls"), opts),
           "lookup_logits_cls": lookup_throughput(cache_dir, opts)}
    if opts["profile"] not in ("0", "", "false"):
        print(profile_loader(cache_dir, opts))
    zrows = int(opts["zarr_rows"])
    if zrows:
        zdir, summary = cache_pass(opts, rest, teacher, tmp / "zarr", zrows, ZARR)
        res["zarr"] = {"cache_rows": summary["rows_in_cache"], "cache_pass_rows_s": summary["rows_per_s"],
                       "layout": str(TeacherCache(zdir).layout)}
        for field in ("hidden", "attention"):
            r = reader_throughput(zdir, ("logits", field), opts, block=128, reads=max(4, int(opts["reads"]) // 4))
            res["zarr"][field] = {**{k: r[k] for k in ("block_rows", "random_rows_s", "sequential_rows_s")},
                                  **token_fields_throughput(zdir, field, opts)}
    return res


def verdict(r: dict) -> dict:
    v = {"loader_overhead_ok": r["overhead"]["overhead_median"] <= 0.05,
         "loader_rows_s_ok": r["overhead"]["loader_rows_s_with_word_ids"] >= 500_000}
    if "zarr" in r:
        v["token_fields_rows_s_ok"] = min(min(r["zarr"][f]["random_rows_s"], r["zarr"][f]["sequential_rows_s"])
                                          for f in ("hidden", "attention")) >= 20_000
    rd = r["reader_logits_cls"]
    v["reader_rows_s_ok"] = min(rd["random_rows_s"], rd["sequential_rows_s"]) >= 50_000
    return v


def main(argv: list[str]) -> None:
    s = Setting(argv, DEFAULTS)
    results = {**s.header(), "targets": TARGETS}
    make_student("bilstm", s.texts, s.num_labels, int(s.opts["seed"]))  # warm: GloVe index and vectors off disk
    with s.tmp() as tmp:
        tmp = Path(tmp)
        cache_dir, _ = cache_pass(s.opts, s.rest, s.teacher, tmp / "cache", int(s.opts["rows"]), LOGITS_CLS)
        results["loader"] = part_loader(s.opts, s.rest, s.teacher, cache_dir, s.texts, s.num_labels, s.device, tmp)
    results["verdict"] = verdict(results["loader"])
    write_results(results, s.opts["out"])


if __name__ == "__main__":
    main(sys.argv[1:])
