"""The cache writer at full speed, without a GPU (issue 14), beside plain writes of the same bytes.

Synthetic teacher outputs of MPNet's shape (hidden 768, 12 heads, 13 [CLS] layers, fp16; token counts drawn
from the tweet corpus tokenised at max_length 64) go straight into the real writer (WriterThread + CacheWriter,
as `make teacher-cache` drives them), as fast as it takes them. In the same run the same number of bytes per
shard is written plainly to the same folder (one sequential write and one fsync per file). Per layout and per
`commit_threads`: rows/s, MB/s, writer/plain (the median of `repeats` alternating pairs: this disk's speed drifts),
bytes/row and where the writer's time went.

The synthetic values are random normals; how well *real* teacher outputs compress is measured beside them, on
the shipped MiniLM's hidden states, attention scores and values over real tweets, per codec.

    python bench/writer.py [rows=8192] [shard_rows=1024] [threads=1,2] [layouts=logits_cls,att4,att4_hidden5_values]
                           [quantize=none,int8] [codecs=none,zstd] [repeats=3] [dir=work/bench/writer]
                           [out=bench/results/writer.json]
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data import assets  # noqa: E402
from data.io import atomic_write_text  # noqa: E402
from pipeline.cache_schema import FieldLayout, Manifest, TeacherInfo, chunk_positions  # noqa: E402
from pipeline.cache_writer import CacheWriter, ShardBuffer, zarr_codecs  # noqa: E402
from pipeline.run_config import CacheConfig  # noqa: E402

MPNET = {"layers": 12, "hidden": 768, "heads": 12, "labels": 3}
LAYOUTS = {  # issue 14's three: logits + every [CLS]; + 4 attention layers; + 5 hidden layers and values
    "logits_cls": dict(cls_layers=list(range(13))),
    "att4": dict(cls_layers=list(range(13)), attention_layers=[3, 6, 9, 12]),
    "att4_hidden5_values": dict(cls_layers=list(range(13)), attention_layers=[3, 6, 9, 12],
                                hidden_layers=[0, 3, 6, 9, 12], values_layer=12),
}
BATCH, MAX_LENGTH = 64, 64


def tweets_and_lengths(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """n tweets drawn from the corpus and their token counts under the shipped (BERT wordpiece) tokenizer."""
    from transformers import AutoTokenizer

    raw = pacsv.read_csv(assets.tweets_csv()).column("text").to_pylist()
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in raw if t]
    pick = np.random.default_rng(seed).choice(len(texts), n, replace=len(texts) < n)
    texts = [texts[i] for i in pick]
    tok = AutoTokenizer.from_pretrained(assets.resolve_model("minilm"))
    ids = tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    return texts, np.array([len(x) for x in ids])


class Synthetic:
    """Teacher outputs as TeacherRunner.forward hands them to the writer (token-level fields packed to their valid
    positions; int8 + fp16 scales when quantised), as views into one block of random numbers: producing a batch
    costs no copy, so the writer, not the producer, sets the pace."""

    def __init__(self, layout: FieldLayout, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.layout = layout
        self.block = rng.standard_normal(64 << 20, dtype=np.float32).astype(np.float16)
        self.int8 = rng.integers(-127, 128, 64 << 20, dtype=np.int8)
        self.at = 0

    def take(self, shape: tuple[int, ...], int8: bool = False):
        import torch

        n, block = int(np.prod(shape)), self.int8 if int8 else self.block
        if self.at + n > block.size:
            self.at = 0
        view = block[self.at:self.at + n].reshape(shape)
        self.at += n
        return torch.from_numpy(view)

    def batch(self, lengths: np.ndarray) -> dict:
        import torch

        b, d, lay = len(lengths), MPNET["hidden"], self.layout
        tokens, pairs, int8 = int(lengths.sum()), int((lengths**2).sum()), lay.quantize == "int8"
        out = {"logits": torch.randn(b, MPNET["labels"])}
        if lay.cls_layers:
            out["cls"] = self.take((b, len(lay.cls_layers), d))
        fields = {"hidden": ((tokens, len(lay.hidden_layers), d), (tokens, len(lay.hidden_layers))),
                  "attention": ((pairs, len(lay.attention_layers), MPNET["heads"]),
                                (b, len(lay.attention_layers), MPNET["heads"])),
                  "values": ((tokens, d), (tokens,))}
        stored = lay.stored()
        for name, (shape, scale_shape) in fields.items():
            if name in stored:
                out[name] = self.take(shape, int8)
                if int8:
                    out[f"{name}_scale"] = self.take(scale_shape).abs()
        return out


def manifest(layout: FieldLayout) -> Manifest:
    teacher = TeacherInfo(name="synthetic-mpnet", path="", model_type="mpnet", num_layers=MPNET["layers"],
                          hidden_size=MPNET["hidden"], num_heads=MPNET["heads"], num_labels=MPNET["labels"],
                          weights_sha256="0" * 64, tokenizer_sha256="0" * 64)
    return Manifest(teacher=teacher, layout=layout, max_length=MAX_LENGTH, label_names=["neg", "neu", "pos"],
                    data_name="synthetic")


def run_writer(folder: Path, layout: FieldLayout, texts: list[str], lengths: np.ndarray, threads: int,
               shard_rows: int) -> dict:
    """Feed every row through the real writer thread, as run_shard does; wall time from first batch to last commit."""
    from pipeline.teacher_runner import WriterThread

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    writer = CacheWriter(folder, manifest(layout))
    writer.manifest.save(folder)
    source = Synthetic(layout)
    thread = WriterThread(writer, CacheConfig.writer_queue, merge=True, commit_threads=threads)
    t0 = time.perf_counter()
    thread.start()
    for s, start in enumerate(range(0, len(lengths), shard_rows)):
        rows = np.arange(start, min(start + shard_rows, len(lengths)))
        rows = rows[np.argsort(lengths[rows], kind="stable")]  # length order inside a shard, as the cache pass
        buf = ShardBuffer(f"train-{s:05d}", "train")
        for b in range(0, len(rows), BATCH):
            idx = rows[b:b + BATCH]
            lens = lengths[idx]
            columns = {"row_id": [f"r{i}" for i in idx], "split": ["train"] * len(idx), "source_id": [None] * len(idx),
                       "method": ["orig"] * len(idx), "provenance": [None] * len(idx),
                       "text": [texts[i] for i in idx], "text_b": [None] * len(idx), "label": [int(i % 3) for i in idx],
                       "set": ["train"] * len(idx), "length": lens.tolist(), "truncated": [False] * len(idx),
                       "input_ids": [list(range(100, 100 + n)) for n in lens]}
            thread.put((buf, columns, source.batch(lens)))
        thread.put(("commit", buf))
    thread.finish()
    wall = time.perf_counter() - t0
    profile = writer.profile.as_dict()
    shutil.rmtree(folder)
    return {"wall_s": wall, "rows_s": len(lengths) / wall, "mb_s": profile["bytes"] / wall / 1e6,
            "bytes_per_row": profile["bytes"] / len(lengths), "shards": len(writer.manifest.shards), **profile}


def run_plain(folder: Path, total_bytes: int, shards: int) -> dict:
    """The same bytes in as many files as shards, one sequential write and one fsync per file: what the disk
    gives."""
    shard_bytes = [total_bytes // shards] * shards
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = np.random.default_rng(1).integers(0, 255, max(shard_bytes), dtype=np.uint8)
    t0 = time.perf_counter()
    for s, n in enumerate(shard_bytes):
        fd = os.open(folder / f"plain-{s:05d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)[:n]
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    wall = time.perf_counter() - t0
    shutil.rmtree(folder)
    return {"wall_s": wall, "mb_s": sum(shard_bytes) / wall / 1e6}


def real_compressibility(n_rows: int = 256) -> dict:
    """Compression ratio and single-thread MB/s of each codec on real teacher outputs, fp16 and int8 (the shipped
    MiniLM over real tweets, through the project's own capture): whether compressing these fields pays at all."""
    import torch
    import zarr
    from zarr.storage import MemoryStore

    from pipeline.teacher import load_classifier
    from pipeline.teacher_runner import TeacherRunner

    torch.manual_seed(0)
    model, tok = load_classifier(assets.resolve_model("minilm"), 3)
    texts, _ = tweets_and_lengths(n_rows, seed=1)
    ids = tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    result = {}
    for quantize in ("none", "int8"):
        layout = FieldLayout(hidden_layers=[0, 2, 4, 6], attention_layers=[2, 4, 6], values_layer=6, quantize=quantize)
        runner = TeacherRunner(model.eval(), tok, layout, MAX_LENGTH, torch.device("cpu"), bf16=False)
        outs = [runner.forward(sorted(ids[b:b + BATCH], key=len)) for b in range(0, n_rows, BATCH)]
        for name in ("hidden", "attention", "values"):
            raw = np.concatenate([o[name].numpy() for o in outs])
            entry = result[f"{name} {'fp16' if quantize == 'none' else 'int8'}"] = {"bytes": raw.nbytes}
            for codec in ("zstd", "blosc-lz4"):
                stored: dict = {}
                arr = zarr.create_array(MemoryStore(stored), shape=raw.shape, dtype=raw.dtype,
                                        compressors=zarr_codecs(codec), config={"write_empty_chunks": True},
                                        chunks=(chunk_positions(raw[0].nbytes, len(raw)), *raw.shape[1:]))
                t0 = time.perf_counter()
                arr[...] = raw
                seconds = time.perf_counter() - t0
                packed = sum(len(v.to_bytes()) for k, v in stored.items() if "/c/" in f"/{k}")
                entry[codec] = {"ratio": round(raw.nbytes / packed, 3), "mb_s": round(raw.nbytes / seconds / 1e6, 1)}
    return result


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    n_rows, shard_rows = int(opts.get("rows", 8192)), int(opts.get("shard_rows", 1024))
    repeats = int(opts.get("repeats", 3))
    all_cores = ",".join(str(i) for i in range(1, (os.cpu_count() or 1) + 1))
    threads = [int(t) for t in opts.get("threads", all_cores).split(",")]
    layouts = opts.get("layouts", ",".join(LAYOUTS)).split(",")
    folder = Path(opts.get("dir", ROOT / "work" / "bench" / "writer"))
    texts, lengths = tweets_and_lengths(n_rows)
    results = []
    codecs, quantize = opts.get("codecs", "none,zstd").split(","), opts.get("quantize", "none,int8").split(",")
    variants = [(name, q, c) for name in layouts for q in quantize for c in codecs
                if len(LAYOUTS[name]) > 1 or (q, c) == (quantize[0], codecs[0])]  # both apply to Zarr fields only
    for name, q, codec in variants:
        layout = FieldLayout(**LAYOUTS[name], zarr_codec=codec, quantize=q)
        label = name + ("" if len(LAYOUTS[name]) == 1 else f" {q} {codec}")
        run_writer(folder / "cache", layout, texts[:256], lengths[:256], 1, shard_rows)  # warm-up: first calls
        for t in threads:
            pairs = []  # the disk's speed drifts from second to second: writer and plain alternate, medians kept
            for _ in range(repeats):
                w = run_writer(folder / "cache", layout, texts, lengths, t, shard_rows)
                pairs.append((w, run_plain(folder / "plain", w["bytes"], w["shards"])))
            ratios = [w["mb_s"] / plain["mb_s"] for w, plain in pairs]
            w, plain = sorted(pairs, key=lambda wp: wp[0]["mb_s"] / wp[1]["mb_s"])[len(pairs) // 2]
            row = {"layout": label, "commit_threads": t, "rows": n_rows, **w, "plain_mb_s": plain["mb_s"],
                   "writer_over_plain": w["mb_s"] / plain["mb_s"], "repeats": repeats,
                   "ratios": [round(r, 3) for r in ratios],
                   "writer_mb_s_all": [round(w["mb_s"], 1) for w, _ in pairs],
                   "plain_mb_s_all": [round(p["mb_s"], 1) for _, p in pairs]}
            results.append(row)
            print(f"{label:>34} threads {t}: {row['rows_s']:8.0f} rows/s {row['mb_s']:7.1f} MB/s, plain "
                  f"{row['plain_mb_s']:7.1f} MB/s, ratio {row['writer_over_plain']:.2f}, "
                  f"{row['bytes_per_row'] / 1e3:.1f} "
                  f"KB/row; s: " + " ".join(f"{k} {v:.1f}" for k, v in row["seconds"].items()), flush=True)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "shape": MPNET, "shard_rows": shard_rows, "batch": BATCH, "mean_tokens": float(lengths.mean()),
              "runs": results, "real_compressibility": real_compressibility(),
              "target": "writer/plain >= 0.8 (layered: or MB/s linear in commit_threads where compression limits)",
              "best": {label: max((r for r in results if r["layout"] == label), key=lambda r: r["writer_over_plain"])
                       ["writer_over_plain"] for label in dict.fromkeys(r["layout"] for r in results)}}
    for label, ratio in report["best"].items():
        print(f"{label:>34}: best writer/plain {ratio:.2f} (target >= 0.8: {'met' if ratio >= 0.8 else 'not met'})")
    for name, entry in report["real_compressibility"].items():
        print(f"real {name:>15}: " + ", ".join(f"{c} x{v['ratio']:.3f} at {v['mb_s']:.0f} MB/s"
                                                for c, v in entry.items() if c != "bytes"))
    out = Path(opts.get("out", ROOT / "bench" / "results" / "writer.json"))
    atomic_write_text(out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
