"""Benchmark K students from one cache vs the same K with the teacher run online (issue 4).

Side by side in one run, on the first `rows` train rows: K students (default bilstm-hinton, textcnn-hinton,
bilstm-tang_mse) trained from one cache, the caching pass (logits + cls) included in the time, vs the same K
trained with the teacher run online (tokenise + forward under inference_mode each step); dev accuracy of every
student on both routes. The stream itself is measured by bench/loader.py. Writes bench/results/student.json
(or out=) and prints it.

    python bench/student.py [rows=2000] [epochs=5] [teacher=DIR] [key=value ...]
    python bench/student.py rows=200 epochs=1 out=/tmp/student.json   # a quick smoke run

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
  seed=0
  out=bench/results/student.json
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stage_two import LOGITS_CLS, REPO, Setting, Step, cache_pass, dev_accuracy, make_student, write_results  # noqa: E402
from pipeline.cache_reader import TeacherCache  # noqa: E402
from pipeline.run_config import RunConfig  # noqa: E402
from pipeline.teacher import encode as teacher_encode  # noqa: E402
from pipeline.teacher import load_classifier  # noqa: E402
from trainer.loader import CacheStream, StreamConfig  # noqa: E402
from trainer.students import text_encoder  # noqa: E402

DEFAULTS = {"epochs": "5", "students": "bilstm-hinton,textcnn-hinton,bilstm-tang_mse",
            "out": str(REPO / "bench/results/student.json")}
TARGETS = {"cached_over_online_time": "<= 0.2 (K students, caching pass included)",
           "dev_accuracy": "cached == online within noise"}


def student_specs(opts: dict) -> list[tuple[str, str]]:
    return [tuple(s.strip().split("-", 1)) for s in opts["students"].split(",") if s.strip()]


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


def main(argv: list[str]) -> None:
    s = Setting(argv, DEFAULTS)
    k, epochs = len(student_specs(s.opts)), int(s.opts["epochs"])
    results = {**s.header(), "epochs": epochs, "students": [f"{a}-{b}" for a, b in student_specs(s.opts)],
               "targets": TARGETS}
    for kind in sorted({kind for kind, _ in student_specs(s.opts)}):  # warm: GloVe index and vectors off disk
        make_student(kind, s.texts, s.num_labels, int(s.opts["seed"]))
    with s.tmp() as tmp:
        cached, cache_dir = cached_route(s.opts, s.rest, s.teacher, Path(tmp), s.texts, s.dev, s.num_labels, s.device)
        online = online_route(s.opts, s.teacher, s.run, s.table, s.dev, s.num_labels, s.device)
        results.update(cached=cached, online=online, comparison=compare(cached, online, len(s.dev[0]), k, epochs),
                       teacher_layers=TeacherCache(cache_dir).manifest.teacher.num_layers)
    c = results["comparison"]
    results["verdict"] = {"cached_time_ok": c["cached_over_online_time"] <= 0.2,
                          "accuracy_within_2sd": all(abs(a["diff"]) <= 2 * a["one_sd_of_diff"]
                                                     for a in c["dev_accuracy"].values())}
    write_results(results, s.opts["out"])


if __name__ == "__main__":
    main(sys.argv[1:])
