"""Fine-tune any HF encoder checkpoint for sequence classification (`python -m pipeline.train_teacher`).

AdamW, linear warm-up + decay, gradient clipping, dev evaluation each epoch, the best
epoch kept as a normal HF folder (config, safetensors, tokenizer) plus metrics.json.
bf16 autocast on GPU.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import assets
from data.metrics import classification_metrics
from data.config import save_config
from data.io import UserError, atomic_write_text, check_output_dir, pick_device, quiet_transformers
from data.prepare import differing_keys, load_meta, load_split

METRICS = "metrics.json"
MIN_LENGTH = 8  # [CLS], [SEP] (twice for a pair) and a few tokens of text
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "data2vec-text", "longformer"}  # ids start at 2


@dataclass
class TeacherConfig:
    checkpoint: str = "minilm"  # "minilm" = the shipped all-MiniLM-L6-v2; else a path or hub name
    num_layers: int = 0  # 0 = all layers; n = keep the first n (tiny teachers for tests)
    out_dir: str = "work/teachers/minilm-tweets"
    max_length: int = 64
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    max_train_rows: int = 0  # 0 = the whole train split
    seed: int = 13
    device: str = "auto"  # auto | cpu | cuda


def model_path(checkpoint: str) -> str:
    """The shipped MiniLM, a local folder or a hub name; a path that does not exist is refused as
    such (transformers would call it a malformed repo id)."""
    path = assets.resolve_model(checkpoint)
    if not Path(path).exists() and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise UserError(f"teacher checkpoint {checkpoint!r} not found: no such folder (nor a hub name)")
    return path


def _unloadable(checkpoint: str, e: Exception) -> UserError:
    reason = (str(e).strip() or type(e).__name__).splitlines()[0]
    return UserError(f"cannot load teacher checkpoint {checkpoint!r}: {reason}")


def check_config(cfg: TeacherConfig, model: str | Path | None = None) -> None:
    """Refuse bad teacher settings before anything is written; max_length and num_layers are bounded
    by `model`'s config (default: the checkpoint's), read without loading weights."""
    from transformers import AutoConfig

    rules = [("epochs", cfg.epochs >= 1, "at least 1"), ("batch_size", cfg.batch_size >= 1, "at least 1"),
             ("max_length", cfg.max_length >= MIN_LENGTH, f"at least {MIN_LENGTH}"), ("lr", cfg.lr > 0, "positive"),
             ("max_train_rows", cfg.max_train_rows >= 0, "0 (all) or more"),
             ("num_layers", cfg.num_layers >= 0, "0 (all) or more"),
             ("warmup_ratio", 0 <= cfg.warmup_ratio <= 1, "in [0, 1]")]
    bad = [f"teacher.{key}={getattr(cfg, key)} (must be {rule})" for key, ok, rule in rules if not ok]
    if bad:
        raise UserError("; ".join(bad))
    quiet_transformers()
    name = str(model or cfg.checkpoint)
    try:
        config = AutoConfig.from_pretrained(model_path(name))
    except (OSError, ValueError) as e:
        raise _unloadable(name, e) from None
    positions = getattr(config, "max_position_embeddings", None)
    if positions and config.model_type in OFFSET_POSITIONS:
        positions -= 2
    if positions and cfg.max_length > positions:
        raise UserError(f"teacher.max_length={cfg.max_length}: {name} has {positions} positions; use at most that")
    layers = getattr(config, "num_hidden_layers", 0)
    if layers and cfg.num_layers > layers:
        raise UserError(f"teacher.num_layers={cfg.num_layers}: {name} has {layers} layers")


def load_classifier(checkpoint: str, num_labels: int, num_layers: int = 0, label_names=None):
    """Model + tokenizer from a checkpoint; a fresh head when the checkpoint has none."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    path = model_path(checkpoint)
    extra = {"num_hidden_layers": num_layers} if num_layers else {}
    if label_names:
        extra["id2label"] = dict(enumerate(label_names))
        extra["label2id"] = {n: i for i, n in enumerate(label_names)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **extra)
    except (OSError, ValueError) as e:
        raise _unloadable(checkpoint, e) from None
    return model, tokenizer


def encode(tokenizer, texts, texts_b, max_length: int) -> dict:
    pairs = texts_b if texts_b is not None and any(t is not None for t in texts_b) else None
    return tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


@torch.inference_mode()
def evaluate(model, tokenizer, table, max_length: int, device, batch_size: int = 64) -> dict:
    """Accuracy and macro-F1 of `model` on a labelled row table."""
    model.eval()
    texts, texts_b = table.column("text").to_pylist(), table.column("text_b").to_pylist()
    labels = np.array(table.column("label").to_pylist())
    order = np.argsort([len(t) for t in texts])
    preds = np.empty(len(texts), dtype=np.int64)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = encode(tokenizer, [texts[j] for j in idx], [texts_b[j] for j in idx], max_length).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits
        preds[idx] = logits.argmax(-1).cpu().numpy()
    return classification_metrics(preds, labels, model.config.num_labels)


def finetune(cfg: TeacherConfig, data_dir: str) -> dict:
    """Fine-tune and save the best-on-dev epoch to cfg.out_dir (written atomically).

    A teacher fine-tuned there on other data is replaced, after a notice: this is the explicit
    re-train (teacher-cache refuses such a folder instead, see check_teacher_data)."""
    check_config(cfg)
    check_output_dir(cfg.out_dir, "teacher.out_dir")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    meta = load_meta(data_dir)
    if why := stale_reason(cfg.out_dir, meta):
        print(f"teacher: {cfg.out_dir} was not fine-tuned on this data ({why}): re-training it")
    train, dev = load_split(data_dir, "train"), load_split(data_dir, "dev")
    train = train.filter(train.column("label").is_valid())
    if cfg.max_train_rows and cfg.max_train_rows < train.num_rows:  # a seeded sample, not the first rows
        keep = np.sort(np.random.default_rng(cfg.seed).choice(train.num_rows, cfg.max_train_rows, replace=False))
        train = train.take(keep)
    if train.num_rows == 0:
        raise UserError(f"{data_dir}: no labelled train rows to fine-tune the teacher on")
    if len(set(train.column("label").to_pylist())) < 2:
        raise UserError(f"{data_dir}: the labelled train rows hold one class only; a teacher needs at least two")
    device = pick_device(cfg.device)
    model, tokenizer = load_classifier(cfg.checkpoint, len(meta["label_names"]), cfg.num_layers, meta["label_names"])
    model.to(device)
    texts, texts_b = train.column("text").to_pylist(), train.column("text_b").to_pylist()
    labels = torch.tensor(train.column("label").to_pylist())
    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in ("bias", "LayerNorm", "norm"))]
    rest = [p for n, p in model.named_parameters() if any(k in n for k in ("bias", "LayerNorm", "norm"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr)
    from tqdm import tqdm
    from transformers import get_linear_schedule_with_warmup

    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    out, best, history = Path(cfg.out_dir), None, []
    gen = torch.Generator().manual_seed(cfg.seed)

    for epoch in range(cfg.epochs):
        model.train()
        t0, perm = time.time(), torch.randperm(len(texts), generator=gen).tolist()
        bar = tqdm(range(steps_per_epoch), desc=f"teacher epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            batch = encode(tokenizer, [texts[i] for i in idx], [texts_b[i] for i in idx], cfg.max_length).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels[idx].to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        dev_metrics = evaluate(model, tokenizer, dev, cfg.max_length, device)
        history.append({"epoch": epoch + 1, "seconds": round(time.time() - t0, 1), **dev_metrics})
        print(f"teacher epoch {epoch + 1}: dev accuracy {dev_metrics['accuracy']:.4f} macro-F1 {dev_metrics['macro_f1']:.4f}")
        if best is None or dev_metrics["accuracy"] > best["accuracy"]:
            best = {"epoch": epoch + 1, **dev_metrics}
            _save_atomically(model, tokenizer, out)
    test = load_split(data_dir, "test")
    test = test.filter(test.column("label").is_valid())
    from transformers import AutoModelForSequenceClassification

    best_model = AutoModelForSequenceClassification.from_pretrained(out).to(device)
    metrics = {"checkpoint": cfg.checkpoint, "best": best, "history": history, "train_rows": len(texts),
               "test": evaluate(best_model, tokenizer, test, cfg.max_length, device) if test.num_rows else None,
               "label_names": meta["label_names"], "max_length": cfg.max_length, "inputs": teacher_inputs(meta)}
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=2))
    save_config(cfg, out, "teacher_config.json")
    return metrics


def _save_atomically(model, tokenizer, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # keep metrics/config written earlier out of the way: the folder is replaced whole
        shutil.rmtree(out)
    tmp.rename(out)


def is_finetuned(path: str | Path) -> bool:
    return (Path(path) / METRICS).is_file()


def teacher_inputs(meta: dict) -> dict:
    """What a fine-tuned teacher is keyed by: the rows it learnt from and their class names."""
    return {"data_fingerprint": meta.get("data_fingerprint"), "label_names": meta["label_names"]}


def stale_reason(path: str | Path, meta: dict) -> str:
    """How the teacher fine-tuned in `path` differs from the data `meta` describes ('': same, or none there)."""
    if not is_finetuned(path):
        return ""
    try:
        recorded = json.loads((Path(path) / METRICS).read_text()).get("inputs")
    except (OSError, ValueError):
        recorded = None
    if recorded is None:
        return "an older version did not record its data"
    differ = differing_keys(recorded, teacher_inputs(meta))
    return f"{', '.join(differ)} differ" if differ else ""


def check_teacher_data(path: str | Path, meta: dict) -> None:
    """Refuse a teacher folder fine-tuned on other data: caching it would give logits of a model that
    never saw these rows (or crash on another label count). Replacing a fine-tuned teacher is
    `make teacher`'s explicit job, never a side effect of caching."""
    if why := stale_reason(path, meta):
        raise UserError(f"{path}: teacher not fine-tuned on this data ({why}); set teacher.out_dir to a new folder "
                        "for this data, or re-train this one with `make teacher`")
