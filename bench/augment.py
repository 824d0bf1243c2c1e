"""Augmentation benchmark: the reference procedures vs ours, side by side on the same rows.

(a) TinyBERT: a faithful re-implementation of the original data_augmentation.py loop (one
    batch-1 MLM forward per single-piece word on `[CLS] masked [SEP] original [SEP]`,
    full-vocabulary logits at every position, autograd on; one full GloVe-matrix search
    per multi-piece word) vs our batched augmenter. Reports the fraction of identical
    candidate lists and the speed ratio.
(b) Tang: a reference-style per-sentence Python loop (as castorini/d-bert augment_data.py)
    vs ours with 1 and 2 workers; input and output sentences per second, after tagging.

`python bench/augment.py [tinybert_rows=200] [tang_rows=2000] [only=tang|tinybert] [device=cpu|cuda]
[mlm=FOLDER|NAME] [glove=shipped|none] [batch=N] [out=FILE]` (`only` re-runs one section and keeps the
other from the last results in `out`, default bench/results/augment.json).

TinyBERT options: `device=cpu` (default): both sides on one torch thread, ours float32 (headline) and
bfloat16. `device=cuda`: the model of both sides on the GPU, torch's thread count left as it is for both
(the GPU does the arithmetic), ours bfloat16 (headline) and float32, the reference float32; implies
only=tinybert. `mlm` any AutoModelForMaskedLM folder (e.g. a random one from bench/random_model.py head=mlm:
timing only), default the offline minilm-mlm. `glove=none` leaves multi-piece words alone on both sides
(the MLM candidates only; GloVe neighbours are a CPU-side precomputed table). `batch` masked copies per
forward of ours (default 256 on cpu, 1024 on cuda).
A GPU run: `python bench/augment.py device=cuda only=tinybert out=bench/results/augment_gpu.json ...`.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from augment.config import TangParams, TinyBertParams  # noqa: E402
from augment.parts import run_method  # noqa: E402
from augment.tinybert import TinyBertAugmenter  # noqa: E402
from data.io import atomic_write_text  # noqa: E402
from data.prepare import load_split  # noqa: E402

DATA = ROOT / "work" / "data" / "tweets"


def best_of(fn, repeat: int, sync=None):
    """(fastest seconds, last result): the usual timeit practice, same for both sides.

    `sync` (torch.cuda.synchronize on a GPU) runs before the clock starts and before it stops."""
    best, out = float("inf"), None
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


# ---------------------------------------------------------------- TinyBERT reference
def reference_glove(spec_limit: int):
    """The reference's prepare_embedding_retrieval: float64, row-normalised, first V words."""
    import pyarrow.parquet as pq

    from data.assets import glove_paths

    emb_path, index_path = glove_paths()
    words = pq.read_table(index_path).column("index").to_pylist()[:spec_limit]
    emb = np.asarray(np.load(emb_path, mmap_mode="r")[:spec_limit], dtype=np.float64)
    emb_norm = (emb.T / np.sum(emb**2, 1) ** 0.5).T
    return emb_norm, {w: i for i, w in enumerate(words)}, words


def reference_word_distance(word: str, glove, m: int) -> list[str]:
    emb_norm, vocab, ids_to_tokens = glove
    if word not in vocab:
        return []
    idx = vocab[word]
    dist = np.dot(emb_norm, emb_norm[idx].T)
    dist[idx] = -np.inf
    cands = [ids_to_tokens[i] for i in np.argsort(-dist)[:m]]
    return [w.title() for w in cands] if word.istitle() else cands


def reference_mlm(model, tok, pieces: list[int], pos: int, m: int) -> list[str]:
    """One forward per word, batch 1, full logits everywhere, autograd on (as the original);
    the input on the model's device."""
    import torch

    cls, sep, mask = tok.cls_token_id, tok.sep_token_id, tok.mask_token_id
    masked = list(pieces)
    masked[pos] = mask
    ids = [cls] + masked + [sep] + pieces + [sep]
    segments = [0] * (len(pieces) + 2) + [1] * (len(pieces) + 1)
    if pos + 1 >= 512:
        return []
    ids, segments = ids[:512], segments[:512]
    dev = next(model.parameters()).device
    predictions = model(torch.tensor([ids], device=dev), token_type_ids=torch.tensor([segments], device=dev)).logits
    top = torch.argsort(predictions[0, pos + 1], descending=True)[:m].tolist()
    return [t for t in tok.convert_ids_to_tokens(top) if not t.startswith("##")]


def reference_tinybert(aug: TinyBertAugmenter, texts: list[str], glove, p: TinyBertParams, seed: int):
    """Candidates per (sentence, word) and the N-draw sampling loop, one word at a time.

    glove=None: multi-piece words get no candidates (as ours with tinybert.glove=none)."""
    model, tok = aug.mlm.model, aug.mlm.tok
    rnd = random.Random(seed)
    cands_all, n_out = [], 0
    for text in texts:
        (words, ids), = aug.segment([text])
        raw = [reference_mlm(model, tok, ids, w.pieces[0], p.k) if len(w.pieces) == 1
               else reference_word_distance(w.norm, glove, p.k) if glove is not None else [] for w in words]
        cands_all.append(raw)
        cands = [c or [text[w.start : w.end]] for c, w in zip(raw, words)]  # the reference's fallback
        sents = [text]
        for _ in range(p.n_samples):
            new = [text[w.start : w.end] for w in words]
            for i in range(len(words)):
                c = rnd.choice(cands[i])
                if rnd.random() < p.p_t:
                    new[i] = c
            s = " ".join(new)
            if s not in sents:
                sents.append(s)
        n_out += len(sents) - 1
    return cands_all, n_out


def compare(ours_cands, ref_cands, glove: bool = True) -> dict:
    """Fractions of identical candidate lists (order included) and sets, per source
    (glove=False: multi-piece words, left alone on both sides, are not counted)."""
    same = {"mlm": [0, 0], "glove": [0, 0]}
    same_set = 0
    for (words, ours_c), ref_c in zip(ours_cands, ref_cands):
        for w, a, b in zip(words, ours_c, ref_c):
            kind = "mlm" if len(w.pieces) == 1 else "glove"
            if kind == "glove" and not glove:
                continue
            same[kind][0] += a == b
            same[kind][1] += 1
            same_set += set(a) == set(b)
    total = same["mlm"][1] + same["glove"][1]
    return {"candidate_words": {k: v[1] for k, v in same.items()},
            "identical_candidate_lists": round((same["mlm"][0] + same["glove"][0]) / max(total, 1), 4),
            "identical_candidate_lists_mlm": round(same["mlm"][0] / max(same["mlm"][1], 1), 4),
            "identical_candidate_lists_glove": round(same["glove"][0] / max(same["glove"][1], 1), 4) if glove else None,
            "identical_candidate_sets": round(same_set / max(total, 1), 4)}


def run_ours(p: TinyBertParams, rows, cache: Path, seed: int, sync=None) -> dict:
    """Our augmenter on `rows` as one chunk (MLM load and GloVe table outside the timing).

    On a GPU the candidates-only pass runs twice (the first warms the kernels up)."""
    aug = TinyBertAugmenter(p, seed, cache, DATA, log=lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    ident = aug.prepare(rows)
    prepare_s = time.perf_counter() - t0
    texts = rows.column("text").to_pylist()
    cand_s, cands = best_of(lambda: aug.candidates(texts, Counter()), 2 if sync else 1, sync)
    run_s, out = best_of(lambda: aug.process(rows, 0), 1, sync)
    return {"aug": aug, "ident": ident, "cands": cands, "prepare_s": prepare_s, "cand_s": cand_s, "run_s": run_s,
            "out": len(out.text)}


def _timings(ours: dict, ref_s: float, ref_out: int, n_rows: int, digits: int) -> dict:
    """Seconds, speed-up and rows/s of ours vs the reference (same keys on CPU and GPU)."""
    return {"reference_seconds": round(ref_s, digits), "ours_seconds": round(ours["run_s"], digits),
            "ours_candidates_only_seconds": round(ours["cand_s"], digits),
            "ours_one_off_prepare_seconds": round(ours["prepare_s"], 2),
            "speedup": round(ref_s / ours["run_s"], 2),
            "reference_rows_per_s": round(n_rows / ref_s, 2), "ours_rows_per_s": round(n_rows / ours["run_s"], 2),
            "reference_samples_out": ref_out, "ours_samples_out": ours["out"]}


def bench_tinybert(n_rows: int, seed: int = 13, device: str = "cpu", mlm: str = "minilm-mlm",
                   glove: str = "shipped", batch: int = 0) -> dict:
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    batch = batch or (1024 if cuda else TinyBertParams().batch)
    rows = load_split(DATA, "train").slice(0, n_rows)
    texts = rows.column("text").to_pylist()
    # Same word set and raw candidate lists on both sides: no filtering beyond the reference's.
    common = dict(word_candidates=False, drop_special=False, protect_twitter=False, mlm=mlm, glove=glove,
                  device=device, batch=batch)
    p = TinyBertParams(**common)
    p16 = TinyBertParams(**common, mlm_dtype="bfloat16")
    use_glove = glove != "none"
    cache = Path(tempfile.mkdtemp(prefix="bench-glove-"))
    ours = run_ours(p, rows, cache, seed, sync)  # float32; cold GloVe table: computed in prepare
    if not cuda:
        torch.set_num_threads(1)  # the reference on one thread too, like ours
    threads = torch.get_num_threads()
    glove_ref = reference_glove(p.glove_vocab) if use_glove else None
    aug = ours["aug"]  # the reference uses our float32 model object (same weights, same device)
    if cuda:  # warm-up: the first batch-1 forwards on a GPU pay one-off kernel and allocator costs
        reference_tinybert(aug, texts[:5], glove_ref, p, seed)
    ref_s, (ref_cands, ref_out) = best_of(lambda: reference_tinybert(aug, texts, glove_ref, p, seed), 1, sync)
    result = {"rows": n_rows, "device": device, "mlm": ours["ident"]["mlm"], "glove": ours["ident"]["glove"],
              "batch": batch, "reference_dtype": "float32"}
    if not cuda:
        par = Path(tempfile.mkdtemp(prefix="bench-tb2-"))
        t0 = time.perf_counter()  # end to end with 2 worker processes (their start and MLM load included)
        two = run_method(TinyBertAugmenter(p, seed, cache, DATA), rows, out_dir=par, params={"bench": 1}, seed=seed,
                         chunk_rows=max(1, n_rows // 4), workers=2, progress=False)
        two_s = time.perf_counter() - t0
        shutil.rmtree(par, ignore_errors=True)
        bf16 = run_ours(p16, rows, cache, seed)
        shutil.rmtree(cache, ignore_errors=True)
        return {
            **result, "torch_threads": 1, "ours_dtype": "float32",
            **compare(ours["cands"], ref_cands, use_glove),
            **_timings(ours, ref_s, ref_out, n_rows, 2),
            "ours_2_workers_to_parquet_seconds": round(two_s, 2), "ours_2_workers_rows_out": two["rows_out"],
            "bfloat16": {"seconds": round(bf16["run_s"], 2), "speedup": round(ref_s / bf16["run_s"], 2),
                         **compare(bf16["cands"], ref_cands, use_glove)},
        }
    # GPU: bfloat16 is the headline for ours; float32 (above) shows the cost of identical candidates.
    fp32 = ours
    ours = run_ours(p16, rows, cache, seed, sync)
    par = Path(tempfile.mkdtemp(prefix="bench-tbgpu-"))
    t0 = time.perf_counter()  # end to end in this process (MLM load to the GPU included; no workers on a GPU)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731 - stdout is the results JSON
    whole = run_method(TinyBertAugmenter(p16, seed, cache, DATA, log=log), rows, out_dir=par, params={"bench": 1},
                       seed=seed, chunk_rows=max(1, n_rows // 4), workers=1, progress=False)
    whole_s = time.perf_counter() - t0
    shutil.rmtree(par, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        **result, "device_name": torch.cuda.get_device_name(),
        "torch_threads": {"reference": threads, "ours": threads,
                          "note": "not forced to 1 on a GPU: the model arithmetic runs there; both sides get "
                                  "torch's default CPU thread count for their CPU-side work"},
        "ours_dtype": "bfloat16",
        **compare(ours["cands"], ref_cands, use_glove),
        **_timings(ours, ref_s, ref_out, n_rows, 3),
        "ours_to_parquet_seconds": round(whole_s, 2), "ours_to_parquet_rows_out": whole["rows_out"],
        "gpu_peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20),
        "float32": {"seconds": round(fp32["run_s"], 3), "speedup": round(ref_s / fp32["run_s"], 2),
                    "candidates_only_seconds": round(fp32["cand_s"], 3),
                    **compare(fp32["cands"], ref_cands, use_glove)},
    }


# ---------------------------------------------------------------- Tang reference
def reference_tang(tokens: list[list[str]], tags: list[list[str]], p: TangParams, seed: int) -> int:
    """The d-bert augment_data.py loop (tags given): list-based unigram, python RNG per word."""
    random.seed(seed)
    pos_dict = defaultdict(list)
    dataset = set()
    for words, tg in zip(tokens, tags):
        for w, t in zip(words, tg):
            pos_dict[t].append(w)
        dataset.add(" ".join(words))
    out = 0
    for words, tg in zip(tokens, tags):
        for _ in range(p.n_iter):
            use_windowing = random.random() < p.p_ng
            gen_words = []
            for word, tag in zip(words, tg):
                roll = random.random()
                if roll < p.p_mask:
                    word = "[MASK]"
                elif roll < p.p_mask + p.p_pos:
                    word = random.choice(pos_dict[tag])
                gen_words.append(word)
            if use_windowing:
                n = random.choice(range(p.ng_min, p.ng_max + 1))
                i = random.randrange(max(1, len(gen_words) - n + 1))
                gen_words = gen_words[i : i + n]
            s = " ".join(gen_words)
            if s not in dataset:
                dataset.add(s)
                out += 1
    return out


def bench_tang(n_rows: int, seed: int = 13) -> dict:
    from augment.tang import TangAugmenter

    rows = load_split(DATA, "train").slice(0, n_rows)
    p = TangParams()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tang-"))
    aug = TangAugmenter(p, seed, tmp / "cache")
    t0 = time.perf_counter()
    ident = aug.prepare(rows)
    tag_s = time.perf_counter() - t0

    ref_s, ref_out = best_of(lambda: reference_tang(aug.tokens, aug.tags, p, seed), 3)
    core_s, core = best_of(lambda: aug.process(rows, 0), 3)

    result = {"rows": n_rows, "tagger": ident["tagger"], "tokenizer": ident["tokenizer"], "n_iter": p.n_iter,
              "tagging_seconds_once": round(tag_s, 2),
              "reference": {"seconds": round(ref_s, 3), "out": ref_out, "in_per_s": round(n_rows / ref_s),
                            "out_per_s": round(ref_out / ref_s)},
              "ours_core_1_worker": {"seconds": round(core_s, 3), "out": len(core.text),
                                     "in_per_s": round(n_rows / core_s), "out_per_s": round(len(core.text) / core_s)}}
    for workers in (1, 2):  # end to end: rows + provenance + Parquet parts + combine
        aug_w = TangAugmenter(p, seed, tmp / "cache", workers)
        aug_w.prepare(rows)
        t0 = time.perf_counter()
        s = run_method(aug_w, rows, out_dir=tmp / f"out{workers}", params={"n_iter": p.n_iter}, seed=seed,
                       chunk_rows=max(1, n_rows // 4), workers=workers, progress=False)
        dt = time.perf_counter() - t0
        result[f"ours_to_parquet_{workers}_worker{'s' if workers > 1 else ''}"] = {
            "seconds": round(dt, 3), "out": s["rows_out"], "in_per_s": round(n_rows / dt),
            "out_per_s": round(s["rows_out"] / dt)}
    same = (tmp / "out1" / "tang.parquet").read_bytes() == (tmp / "out2" / "tang.parquet").read_bytes()
    result["workers_1_vs_2_identical_bytes"] = same
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    known = {"tinybert_rows", "tang_rows", "only", "device", "mlm", "glove", "batch", "out"}
    device, glove = args.get("device", "cpu"), args.get("glove", "shipped")
    if set(args) - known or device not in ("cpu", "cuda") or glove not in ("shipped", "none"):
        print(f"error: options are {sorted(known)}; device=cpu|cuda, glove=shipped|none", file=sys.stderr)
        return 2
    tb_rows, tang_rows = int(args.get("tinybert_rows", 200)), int(args.get("tang_rows", 2000))
    if not (DATA / "train.parquet").is_file():
        print(f"error: {DATA}/train.parquet not found: run `python -m data.prepare max_rows=6000` first", file=sys.stderr)
        return 2
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: device=cuda but torch sees no GPU", file=sys.stderr)
            return 2
    only = args.get("only", "tinybert" if device == "cuda" else "")  # Tang is CPU work
    out = Path(args.get("out", ROOT / "bench" / "results" / "augment.json"))
    results = json.loads(out.read_text()) if only and out.is_file() else {}
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "load_average_1min_before": round(os.getloadavg()[0], 2)}
    if device == "cuda":
        import torch
        import transformers

        machine.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       transformers=transformers.__version__)
    tinybert = lambda: bench_tinybert(tb_rows, device=device, mlm=args.get("mlm", "minilm-mlm"),  # noqa: E731
                                      glove=glove, batch=int(args.get("batch", 0)))
    for name, fn in (("tang", lambda: bench_tang(tang_rows)), ("tinybert", tinybert)):
        if only in ("", name):
            results[name] = dict(fn(), machine=dict(machine, load_average_1min_after=round(os.getloadavg()[0], 2)))
    results.pop("machine", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
