"""Benchmark stage two (issue 4): the streaming loader, and K students from one cache vs an online teacher.

Side by side in one run, on the same rows and the same training step:
  1. loader overhead: a BiLSTM + Hinton-loss step (batch 64) fed from CacheStream (fields logits + cls)
     vs the very same batches already collated in RAM; raw ShardReader throughput (random and sequential
     block reads of logits + cls), the loader's rows/s without a student, single-row TeacherCache.lookup,
     and block reads of the Zarr fields (hidden, attention) of a small full cache, for information.
  2. K students (default bilstm-hinton, textcnn-hinton, bilstm-tang_mse) trained from one cache, the
     caching pass (logits + cls) included in the time, vs the same K trained with the teacher run online
     (tokenise + forward under inference_mode each step); dev accuracy of every student on both routes.
Writes bench/results/student.json (or out=) and prints it.

    python bench/student.py [rows=2000] [epochs=5] [teacher=DIR] [key=value ...]
    python bench/student.py rows=200 epochs=1 zarr_rows=128 out=/tmp/student.json   # a quick smoke run

Options (anything else is a RunConfig override, e.g. teacher.max_length=48 teacher.num_layers=2):
  rows=2000          train rows (the first by row id, as cache.max_rows picks them)
  epochs=5           epochs per student, both routes (TrainConfig's default; with K students the teacher-forward
                     ratio of the two routes is 1/(K*epochs), so epochs=2 cannot reach the 1/5 target on CPU)
  students=bilstm-hinton,textcnn-hinton,bilstm-tang_mse
  batch=64           student batch size
  teacher=DIR        a fine-tuned teacher; default: the config's teacher.out_dir if fine-tuned, else one is
                     fine-tuned quickly (1 epoch) into work/bench/<name>-quick-r<teacher_rows>[-L<n>] and reused
  teacher_rows=512   train rows of that quick fine-tune (timing does not need a good teacher) ...
  teacher_lr=2e-4    ... and its learning rate (high, so 16 steps move it off the majority class)
  config=configs/cpu.yaml
  device=auto        students and teacher (auto: cuda if visible)
  threads=0          torch threads (0: torch's default)
  repeats=3          loader-overhead repetitions (stream and RAM interleaved; best of them, and medians)
  reads=40           random block reads (reader throughput); block=512 rows (StreamConfig.block_rows)
  lookups=300        single-row TeacherCache.lookup calls
  zarr_rows=512      rows of the small hidden/attention/values cache for Zarr reads (0: skip)
  profile=0          1: cProfile the loader (stream without a student) and print the top functions
  parts=loader,students   which parts to run
  seed=0
  out=bench/results/student.json
"""
from __future__ import annotations

import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from data.config import load_config  # noqa: E402
from data.io import atomic_write_text  # noqa: E402
from data.prepare import load_meta, load_split, prepare  # noqa: E402
from pipeline.cache_reader import TeacherCache  # noqa: E402
from pipeline.run_config import RunConfig  # noqa: E402
from pipeline.teacher import encode as teacher_encode  # noqa: E402
from data.io import pick_device  # noqa: E402
from pipeline.teacher import finetune, is_finetuned, load_classifier  # noqa: E402
from pipeline.teacher_cache import build_cache  # noqa: E402
from trainer.loader import CacheStream, StreamConfig  # noqa: E402
from trainer.losses import get_loss, make_params  # noqa: E402
from trainer.students import build_student, text_encoder  # noqa: E402
from trainer.run_setup import optimizer  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402
from trainer.vocab import Vocab, load_embeddings  # noqa: E402

DEFAULTS = {"rows": "2000", "epochs": "5", "students": "bilstm-hinton,textcnn-hinton,bilstm-tang_mse",
            "batch": "64", "teacher": "", "teacher_rows": "512", "teacher_lr": "2e-4",
            "config": str(REPO / "configs/cpu.yaml"),
            "device": "auto", "threads": "0", "repeats": "3", "reads": "40", "lookups": "300", "zarr_rows": "512",
            "profile": "0", "parts": "loader,students", "seed": "0", "out": str(REPO / "bench/results/student.json")}
TARGETS = {"loader_overhead": "<= 0.05 ((t_stream - t_ram) / t_ram, medians of the repeats, BiLSTM + hinton, batch 64)",
           "reader_logits_cls_rows_s": ">= 50000 (2 CPU cores)",
           "loader_rows_s_with_word_ids": ">= 500000 (logits + cls + word ids, no student)",
           "token_fields_rows_s": ">= 20000 (hidden, attention: ShardReader.columns, 128-row blocks; the stream's "
                                  "padded fp32 batches are reported beside)",
           "cached_over_online_time": "<= 0.2 (K students, caching pass included)",
           "dev_accuracy": "cached == online within noise"}
LOGITS_CLS = {"cache.cls_layers": "all", "cache.hidden_layers": "none", "cache.attention_layers": "none",
              "cache.store_values": "false"}
ZARR = {"cache.cls_layers": "all", "cache.hidden_layers": "auto", "cache.attention_layers": "auto",
        "cache.store_values": "true"}


# ---------------------------------------------------------------- set-up
def parse_opts(argv: list[str]) -> tuple[dict, list[str]]:
    opts, rest = dict(DEFAULTS), []
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and key in DEFAULTS:
            opts[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    return opts, rest


def run_config(opts: dict, rest: list[str], **items) -> RunConfig:
    return load_config(RunConfig, opts["config"], rest + [f"{k}={v}" for k, v in items.items()])


def ensure_teacher(run: RunConfig, opts: dict) -> Path:
    """The fine-tuned teacher to use; fine-tunes a quick one when none exists (never over the config's)."""
    if opts["teacher"]:
        path = Path(opts["teacher"])
    elif is_finetuned(run.teacher.out_dir):
        path = Path(run.teacher.out_dir)
    else:
        layers = f"-L{run.teacher.num_layers}" if run.teacher.num_layers else ""
        path = REPO / "work" / "bench" / f"{Path(run.teacher.out_dir).name}-quick-r{opts['teacher_rows']}{layers}"
    if not is_finetuned(path):
        if not (Path(run.data.out_dir) / "meta.json").is_file():
            prepare(run.data)
        cfg = replace(run.teacher, out_dir=str(path), epochs=1, max_train_rows=int(opts["teacher_rows"]),
                      lr=float(opts["teacher_lr"]))
        print(f"no fine-tuned teacher at {path}: fine-tuning {cfg.checkpoint} on {cfg.max_train_rows} rows "
              "(timing only)")
        with tempfile.TemporaryDirectory(prefix="bench-teacher-data-") as tmp:
            finetune(cfg, mixed_train_split(run.data.out_dir, Path(tmp)))
    return path


def mixed_train_split(data_dir: str, tmp: Path) -> str:
    """A copy of the data folder whose train rows are in row-id order: finetune's max_train_rows takes the
    first rows, and the prepared train split is ordered by label (its first 512 rows are all one class)."""
    import shutil

    import pyarrow.parquet as pq

    for name in ("meta.json", "dev.parquet", "test.parquet"):
        shutil.copy(Path(data_dir) / name, tmp / name)
    pq.write_table(load_split(data_dir, "train").sort_by("row_id"), tmp / "train.parquet")
    return str(tmp)


def cache_pass(opts: dict, rest: list[str], teacher: Path, root: Path, rows: int, layout: dict) -> tuple[Path, dict]:
    """build_cache over the first `rows` train rows into `root` (no augmented sets); wall seconds included."""
    run = run_config(opts, rest, **{"teacher.out_dir": str(teacher), "cache.root": str(root), "cache.name": "bench",
                                    "cache.splits": "train", "cache.max_rows": rows,
                                    "cache.augment_dir": str(root / "no-augment"), "cache.device": opts["device"],
                                    **layout})
    t0 = time.perf_counter()
    summary = build_cache(run)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return Path(summary["cache"]), summary


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def student_specs(opts: dict) -> list[tuple[str, str]]:
    return [tuple(s.strip().split("-", 1)) for s in opts["students"].split(",") if s.strip()]


def make_student(kind: str, texts: list[str], num_labels: int, seed: int):
    """As trainer.run_setup.build does for word students: vocabulary of the train texts, GloVe 50d."""
    torch.manual_seed(seed)
    vocab = Vocab.build(texts)
    embeddings, _ = load_embeddings(vocab, "glove50")
    return build_student(kind, {"num_labels": num_labels}, vocab=vocab, embeddings=torch.as_tensor(embeddings))


class Step:
    """The student step of trainer.train.train_run: forward, loss, backward, clip, AdamW, schedule."""

    def __init__(self, model, loss: str, total_steps: int, device):
        self.model, self.spec, self.device = model.to(device), get_loss(loss), device
        self.params = make_params(loss, {})
        self.cfg = TrainConfig()
        self.opt, self.sched = optimizer(model, 1e-3, self.cfg, total_steps)
        self.want, self.step = frozenset(self.spec.student_needs), 0

    def __call__(self, batch: dict) -> float:
        batch = _to(batch, self.device)
        out = self.model(batch, self.want)
        loss, _ = self.spec.fn(out, batch, self.params, {"epoch": 0, "step": self.step})
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return loss.item()


@torch.no_grad()
def dev_accuracy(model, texts: list[str], labels: np.ndarray, device, batch_size: int = 256) -> float:
    model.eval()
    preds = [model(_to(model.encode_texts(texts[i : i + batch_size]), device)).logits.argmax(-1).cpu().numpy()
             for i in range(0, len(texts), batch_size)]
    model.train()
    return float(np.mean(np.concatenate(preds) == labels))


# ---------------------------------------------------------------- part 1: loader and reader
def _median(xs):
    return statistics.median(xs) if xs else None


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
    plain = CacheStream(cache_dir, ["train"], ("cls", "logits"), StreamConfig(batch_size=bs, seed=seed))
    per_batch = CacheStream(cache_dir, ["train"], ("cls", "logits"), StreamConfig(batch_size=bs, seed=seed),
                            encode=model.encode_texts)
    for _ in range(repeats):
        for s, acc in ((stream, loader_s), (plain, plain_s), (per_batch, per_batch_s)):
            s.set_epoch(0)
            t0 = time.perf_counter()
            for _b in s:
                pass
            acc.append(time.perf_counter() - t0)
    return {"student": "bilstm", "loss": "hinton", "fields": ["logits", "cls"], "batch_size": bs, "steps": n,
            "rows": stream.num_rows, "repeats": repeats,
            "stream_seconds": [round(t, 3) for t in t_stream], "ram_seconds": [round(t, 3) for t in t_ram],
            "stream_steps_s": round(n / ts, 2), "ram_steps_s": round(n / tr, 2),
            "overhead": round((ts - tr) / tr, 4),
            "overhead_median": round((_median(t_stream) - _median(t_ram)) / _median(t_ram), 4),
            "step_ms_ram": round(1000 * tr / n, 2),
            "loader_ms_per_batch_with_word_ids": round(1000 * _median(loader_s) / n, 3),
            "loader_ms_per_batch_no_words": round(1000 * _median(plain_s) / n, 3),
            "loader_rows_s_no_words": round(stream.num_rows / _median(plain_s)),
            "loader_rows_s_with_word_ids": round(stream.num_rows / _median(loader_s)),
            "loader_rows_s_tokenising_per_batch": round(stream.num_rows / _median(per_batch_s)),
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
    return {"stream_rows_s": round(stream.num_rows / _median(seconds)), "rows": stream.num_rows}


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


# ---------------------------------------------------------------- part 2: K students, cached vs online
def online_batches(lengths: np.ndarray, bs: int, seed: int, epoch: int, window: int = 4096) -> list[np.ndarray]:
    """Like CacheStream's: a seeded shuffle, then length buckets inside windows of 4,096 rows, batch order shuffled."""
    rng = np.random.default_rng([seed, epoch])
    perm, batches = rng.permutation(len(lengths)), []
    for w in range(0, len(perm), window):
        idx = perm[w : w + window]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        cut = [idx[i : i + bs] for i in range(0, len(idx), bs)]
        batches += [cut[i] for i in rng.permutation(len(cut))]
    return batches


def cached_route(opts, rest, teacher: Path, tmp: Path, texts, dev, num_labels, device) -> tuple[dict, Path]:
    bs, epochs, seed = int(opts["batch"]), int(opts["epochs"]), int(opts["seed"])
    t_all = time.perf_counter()
    cache_dir, summary = cache_pass(opts, rest, teacher, tmp / "cache", int(opts["rows"]), LOGITS_CLS)
    runs = {}
    for kind, loss in student_specs(opts):
        t0 = time.perf_counter()
        model = make_student(kind, texts, num_labels, seed)
        stream = CacheStream(cache_dir, ["train"], ("cls", "logits"), StreamConfig(batch_size=bs, seed=seed),
                             encode=text_encoder(model, TeacherCache(cache_dir), ["train"]))
        step = Step(model, loss, math.ceil(stream.num_rows / bs) * epochs, device)
        for epoch in range(epochs):
            stream.set_epoch(epoch)
            for batch in stream:
                batch.pop("stream")
                step(batch)
        acc = dev_accuracy(model, *dev, device)
        runs[f"{kind}-{loss}"] = {"seconds": round(time.perf_counter() - t0, 2), "steps": step.step,
                                  "dev_accuracy": acc}
        print(f"cached  {kind}-{loss}: {runs[f'{kind}-{loss}']}")
    total = time.perf_counter() - t_all
    return {"total_seconds": round(total, 2), "cache_pass_seconds": summary["wall_seconds"],
            "cache_pass_rows_s": summary["rows_per_s"], "cache_rows": summary["rows_in_cache"],
            "students": runs}, cache_dir


def online_route(opts, teacher: Path, run: RunConfig, table, dev, num_labels, device) -> dict:
    bs, epochs, seed = int(opts["batch"]), int(opts["epochs"]), int(opts["seed"])
    texts, texts_b = table.column("text").to_pylist(), table.column("text_b").to_pylist()
    labels = torch.tensor([-100 if y is None else y for y in table.column("label").to_pylist()], dtype=torch.long)
    lengths = np.array([len(t or "") for t in texts])
    t_all = time.perf_counter()
    model_t, tok = load_classifier(str(teacher), num_labels)
    model_t.to(device).eval()
    load_s = time.perf_counter() - t_all
    runs, teacher_s, cuda = {}, 0.0, device.type == "cuda"
    for kind, loss in student_specs(opts):
        t0 = time.perf_counter()
        model = make_student(kind, texts, num_labels, seed)
        step = Step(model, loss, math.ceil(len(texts) / bs) * epochs, device)
        t_teacher = 0.0
        for epoch in range(epochs):
            for idx in online_batches(lengths, bs, seed, epoch):
                tt = time.perf_counter()
                bt, bb = [texts[i] for i in idx], [texts_b[i] for i in idx]
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    enc = teacher_encode(tok, bt, bb, run.teacher.max_length).to(device)
                    logits = model_t(**enc).logits.float()  # bf16 on GPU, as the caching pass runs it
                logits = logits.clone()  # a normal tensor: inference tensors cannot enter autograd
                if cuda:
                    torch.cuda.synchronize()
                t_teacher += time.perf_counter() - tt
                step({"labels": labels[idx], "teacher_logits": logits, **model.encode_texts(bt, bb)})
        acc = dev_accuracy(model, *dev, device)
        teacher_s += t_teacher
        runs[f"{kind}-{loss}"] = {"seconds": round(time.perf_counter() - t0, 2), "teacher_forward_seconds":
                                  round(t_teacher, 2), "steps": step.step, "dev_accuracy": acc}
        print(f"online  {kind}-{loss}: {runs[f'{kind}-{loss}']}")
    total = time.perf_counter() - t_all
    return {"total_seconds": round(total, 2), "teacher_load_seconds": round(load_s, 2),
            "teacher_forward_seconds": round(teacher_s, 2),
            "teacher_forward_rows_s": round(len(texts) * epochs * len(runs) / teacher_s, 1) if teacher_s else None,
            "students": runs}


def compare(cached: dict, online: dict, n_dev: int, k: int, epochs: int) -> dict:
    acc = {}
    for name, c in cached["students"].items():
        o = online["students"][name]
        p = (c["dev_accuracy"] + o["dev_accuracy"]) / 2
        acc[name] = {"cached": round(c["dev_accuracy"], 4), "online": round(o["dev_accuracy"], 4),
                     "diff": round(c["dev_accuracy"] - o["dev_accuracy"], 4),
                     "one_sd_of_diff": round(math.sqrt(2 * p * (1 - p) / n_dev), 4)}
    student_cached = sum(c["seconds"] for c in cached["students"].values())
    student_online = sum(o["seconds"] - o["teacher_forward_seconds"] for o in online["students"].values())
    return {"cached_over_online_time": round(cached["total_seconds"] / online["total_seconds"], 4),
            "speedup": round(online["total_seconds"] / cached["total_seconds"], 2),
            "teacher_rows_ratio": round(1 / (k * epochs), 4),  # teacher forwards: one pass vs K * epochs passes
            "ratio_if_students_were_free": round(cached["cache_pass_seconds"] / online["teacher_forward_seconds"], 4)
            if online["teacher_forward_seconds"] else None,
            # the same student work on both routes (batches from the cache vs built from the teacher's outputs)
            "student_seconds_cached_route": round(student_cached, 2),
            "student_seconds_online_route_excl_teacher": round(student_online, 2),
            "dev_accuracy": acc, "dev_rows": n_dev}


# ---------------------------------------------------------------- main
def main(argv: list[str]) -> None:
    opts, rest = parse_opts(argv)
    if int(opts["threads"]):
        torch.set_num_threads(int(opts["threads"]))
    run = run_config(opts, rest)
    teacher = ensure_teacher(run, opts)
    device = pick_device(opts["device"])
    data_dir, rows = run.data.out_dir, int(opts["rows"])
    num_labels = len(load_meta(data_dir)["label_names"])
    table = load_split(data_dir, "train").sort_by("row_id").slice(0, rows)  # the rows cache.max_rows picks
    texts = table.column("text").to_pylist()
    dev_t = load_split(data_dir, "dev")
    dev_t = dev_t.filter(dev_t.column("label").is_valid())
    dev = (dev_t.column("text").to_pylist(), np.array(dev_t.column("label").to_pylist()))
    parts = set(opts["parts"].split(","))
    k, epochs = len(student_specs(opts)), int(opts["epochs"])
    teacher_metrics = json.loads((teacher / "metrics.json").read_text()) if (teacher / "metrics.json").is_file() else {}
    results = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
               "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "teacher": str(teacher), "teacher_layers": None,
               "teacher_dev_accuracy": (teacher_metrics.get("best") or {}).get("accuracy"),
               "rows": table.num_rows, "epochs": epochs, "batch_size": int(opts["batch"]),
               "students": [f"{s}-{l}" for s, l in student_specs(opts)], "max_length": run.teacher.max_length,
               "options": opts, "overrides": rest, "targets": TARGETS}
    for kind in sorted({kind for kind, _ in student_specs(opts)}):  # warm: GloVe index and vectors off disk
        make_student(kind, texts, num_labels, int(opts["seed"]))
    with tempfile.TemporaryDirectory(prefix="bench-student-") as tmp:
        tmp = Path(tmp)
        cache_dir = None
        if "students" in parts:
            cached, cache_dir = cached_route(opts, rest, teacher, tmp, texts, dev, num_labels, device)
            online = online_route(opts, teacher, run, table, dev, num_labels, device)
            results.update(cached=cached, online=online, comparison=compare(cached, online, len(dev[0]), k, epochs))
        if "loader" in parts:
            if cache_dir is None:
                cache_dir, _ = cache_pass(opts, rest, teacher, tmp / "cache", rows, LOGITS_CLS)
            results["loader"] = part_loader(opts, rest, teacher, cache_dir, texts, num_labels, device, tmp)
        if cache_dir is not None:
            results["teacher_layers"] = TeacherCache(cache_dir).manifest.teacher.num_layers
    results["verdict"] = verdict(results)
    out = Path(opts["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {out}")


def verdict(r: dict) -> dict:
    v = {}
    if "loader" in r:
        v["loader_overhead_ok"] = r["loader"]["overhead"]["overhead_median"] <= 0.05
        v["loader_rows_s_ok"] = r["loader"]["overhead"]["loader_rows_s_with_word_ids"] >= 500_000
        if "zarr" in r["loader"]:
            z = r["loader"]["zarr"]
            v["token_fields_rows_s_ok"] = min(min(z[f]["random_rows_s"], z[f]["sequential_rows_s"])
                                              for f in ("hidden", "attention")) >= 20_000
        rd = r["loader"]["reader_logits_cls"]
        v["reader_rows_s_ok"] = min(rd["random_rows_s"], rd["sequential_rows_s"]) >= 50_000
    if "comparison" in r:
        c = r["comparison"]
        v["cached_time_ok"] = c["cached_over_online_time"] <= 0.2
        v["accuracy_within_2sd"] = all(abs(a["diff"]) <= 2 * a["one_sd_of_diff"] for a in c["dev_accuracy"].values())
    return v


if __name__ == "__main__":
    main(sys.argv[1:])
