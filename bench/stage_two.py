"""What the stage-two benchmarks (bench/loader.py, bench/student.py) share: options, the teacher, a cache pass over
the first train rows, word students built as trainer.run_setup builds them, and the trainer's step."""
from __future__ import annotations

import json
import os
import platform
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
from data.io import atomic_write_text, pick_device  # noqa: E402
from data.prepare import load_meta, load_split, prepare  # noqa: E402
from pipeline.run_config import RunConfig  # noqa: E402
from pipeline.teacher import finetune, is_finetuned  # noqa: E402
from pipeline.teacher_cache import build_cache  # noqa: E402
from trainer.loader import to_device  # noqa: E402
from trainer.losses import get_loss, make_params  # noqa: E402
from trainer.run_setup import optimizer  # noqa: E402
from trainer.students import build_student  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402
from trainer.vocab import Vocab, load_embeddings  # noqa: E402

DEFAULTS = {"rows": "2000", "batch": "64", "teacher": "", "teacher_rows": "512", "teacher_lr": "2e-4",
            "config": str(REPO / "configs/cpu.yaml"), "device": "auto", "threads": "0", "seed": "0"}
LOGITS_CLS = {"cache.cls_layers": "all", "cache.hidden_layers": "none", "cache.attention_layers": "none",
              "cache.store_values": "false"}
ZARR = {"cache.cls_layers": "all", "cache.hidden_layers": "auto", "cache.attention_layers": "auto",
        "cache.store_values": "true"}


def parse_opts(argv: list[str], defaults: dict) -> tuple[dict, list[str]]:
    """`key=value` options the bench knows (`defaults`: the shared ones and its own); the rest are RunConfig
    overrides."""
    defaults = {**DEFAULTS, **defaults}
    opts, rest = dict(defaults), []
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and key in defaults:
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


def make_student(kind: str, texts: list[str], num_labels: int, seed: int):
    """As trainer.run_setup.build does for word students: vocabulary of the train texts, GloVe 50d."""
    torch.manual_seed(seed)
    vocab = Vocab.build(texts)
    embeddings, _ = load_embeddings(vocab, "glove50")
    return build_student(kind, {"num_labels": num_labels}, vocab=vocab, embeddings=torch.as_tensor(embeddings))


class Step:
    """The student step of trainer.steps.train_step: forward, loss, backward, clip, AdamW, schedule."""

    def __init__(self, model, loss: str, total_steps: int, device):
        self.model, self.spec, self.device = model.to(device), get_loss(loss), device
        self.params = make_params(loss, {})
        self.cfg = TrainConfig()
        self.opt, self.sched = optimizer(model, 1e-3, self.cfg, total_steps)
        self.want, self.step = frozenset(self.spec.student_needs), 0

    def __call__(self, batch: dict) -> float:
        batch = to_device(batch, self.device)
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
    preds = [model(to_device(model.encode_texts(texts[i : i + batch_size]), device)).logits.argmax(-1).cpu().numpy()
             for i in range(0, len(texts), batch_size)]
    model.train()
    return float(np.mean(np.concatenate(preds) == labels))


def median(xs):
    return statistics.median(xs) if xs else None


class Setting:
    """The rows, teacher and device a benchmark runs on (its options parsed, torch threads set)."""

    def __init__(self, argv: list[str], defaults: dict):
        self.opts, self.rest = parse_opts(argv, defaults)
        if int(self.opts["threads"]):
            torch.set_num_threads(int(self.opts["threads"]))
        self.run = run_config(self.opts, self.rest)
        self.teacher = ensure_teacher(self.run, self.opts)
        self.device = pick_device(self.opts["device"])
        data_dir = self.run.data.out_dir
        self.num_labels = len(load_meta(data_dir)["label_names"])
        self.table = load_split(data_dir, "train").sort_by("row_id").slice(0, int(self.opts["rows"]))  # as max_rows
        self.texts = self.table.column("text").to_pylist()
        dev = load_split(data_dir, "dev")
        dev = dev.filter(dev.column("label").is_valid())
        self.dev = (dev.column("text").to_pylist(), np.array(dev.column("label").to_pylist()))

    def header(self) -> dict:
        metrics = self.teacher / "metrics.json"
        best = (json.loads(metrics.read_text()).get("best") or {}) if metrics.is_file() else {}
        return {"device": str(self.device),
                "gpu": torch.cuda.get_device_name() if self.device.type == "cuda" else None,
                "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "teacher": str(self.teacher),
                "teacher_dev_accuracy": best.get("accuracy"), "rows": self.table.num_rows,
                "batch_size": int(self.opts["batch"]), "max_length": self.run.teacher.max_length,
                "options": self.opts, "overrides": self.rest}

    def tmp(self):
        return tempfile.TemporaryDirectory(prefix="bench-stage-two-")


def write_results(results: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {path}")
