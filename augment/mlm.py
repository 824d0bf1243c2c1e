"""The masked LM behind TinyBERT substitution: load one, or build the offline default.

No masked-LM head ships offline, so "minilm-mlm" is a BertForMaskedLM on the shipped
MiniLM encoder whose prediction head (transform + bias; decoder tied to the word
embeddings) is trained briefly on the task's train split with standard 15% masking. It
is saved once as a safetensors folder with a metadata JSON (corpus fingerprint, steps)
and reused while that metadata matches.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from data.io import UserError, atomic_replace_dir, atomic_write_text, sha256_tree

META = "distil_mlm.json"


def quiet_transformers() -> None:
    """Load reports and weight-loading bars are noise in a CLI that loads one model."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _mask_batch(ids, special, mask_id: int, vocab: int, gen):
    """BERT masking: 15% of real tokens; of those 80% [MASK], 10% random, 10% kept."""
    import torch

    labels = ids.clone()
    pick = (torch.rand(ids.shape, generator=gen) < 0.15) & ~special
    labels[~pick] = -100
    ids = ids.clone()
    r = torch.rand(ids.shape, generator=gen)
    ids[pick & (r < 0.8)] = mask_id
    rand = pick & (r >= 0.8) & (r < 0.9)
    ids[rand] = torch.randint(vocab, ids.shape, generator=gen)[rand]
    return ids, labels


def train_head(model, tokenizer, texts: list[str], *, steps: int, batch: int, lr: float, train_encoder: bool,
               seed: int, max_length: int = 128) -> list[float]:
    """Fit the MLM head (and the encoder when asked) on `texts`; returns the loss curve."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    seqs = [torch.tensor(x) for x in enc["input_ids"]]
    head = model.cls
    for p in model.parameters():
        p.requires_grad_(train_encoder)
    for p in head.predictions.transform.parameters():
        p.requires_grad_(True)
    head.predictions.bias.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    curve = []
    for step in range(steps):
        pick = torch.randint(len(seqs), (batch,), generator=gen).tolist()
        ids = torch.nn.utils.rnn.pad_sequence([seqs[i] for i in pick], batch_first=True,
                                              padding_value=tokenizer.pad_token_id)
        att = (ids != tokenizer.pad_token_id).long()
        special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
        inp, labels = _mask_batch(ids, special, tokenizer.mask_token_id, model.config.vocab_size, gen)
        if train_encoder:
            hidden = model.bert(input_ids=inp, attention_mask=att).last_hidden_state
        else:
            with torch.no_grad():
                hidden = model.bert(input_ids=inp, attention_mask=att).last_hidden_state
        sel = labels != -100
        logits = head(hidden[sel])
        loss = torch.nn.functional.cross_entropy(logits, labels[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(round(float(loss), 4))
    model.eval()
    return curve


def build_minilm_mlm(folder: Path, texts: list[str], meta: dict) -> None:
    """Train the default MLM and save it (safetensors + tokenizer + metadata) atomically."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from data.assets import minilm_path

    base = minilm_path()
    torch.manual_seed(meta["seed"])
    kwargs = {"num_hidden_layers": meta["layers"]} if meta["layers"] else {}
    model = BertForMaskedLM.from_pretrained(base, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(base)
    t0 = time.perf_counter()
    curve = train_head(model, tokenizer, texts, steps=meta["steps"], batch=meta["batch"], lr=meta["lr"],
                       train_encoder=meta["train_encoder"], seed=meta["seed"])
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = dict(meta, loss_first=curve[:5], loss_last=curve[-5:], train_seconds=round(time.perf_counter() - t0, 1))
    atomic_write_text(tmp / META, json.dumps(info, indent=2))
    atomic_replace_dir(tmp, folder)


def ensure_minilm_mlm(mlm_dir: str | Path, texts: list[str], corpus_fingerprint: str, *, steps: int, batch: int,
                      lr: float, layers: int, train_encoder: bool, seed: int, log=print) -> Path:
    """The minilm-mlm folder for this corpus and recipe: reused when its metadata matches."""
    from data.assets import minilm_path

    folder = Path(mlm_dir) / ("minilm-mlm" if not layers else f"minilm-mlm-l{layers}")
    meta = {"base": "all-MiniLM-L6-v2", "base_path": str(minilm_path()), "corpus_fingerprint": corpus_fingerprint,
            "steps": steps, "batch": batch, "lr": lr, "layers": layers, "train_encoder": train_encoder, "seed": seed}
    marker = folder / META
    if marker.is_file():
        old = json.loads(marker.read_text())
        if all(old.get(k) == v for k, v in meta.items() if k != "base_path"):
            return folder
    if not texts:
        raise UserError("minilm-mlm: no training texts (the train split is empty)")
    log(f"building minilm-mlm in {folder}: training its prediction head for {steps} steps on {len(texts)} texts")
    build_minilm_mlm(folder, texts, meta)
    return folder


def load_mlm(name: str):
    """(model, tokenizer, identity) for any AutoModelForMaskedLM folder or hub name."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    quiet_transformers()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(name, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"tinybert.mlm: cannot load masked LM {name!r} ({first}); give an AutoModelForMaskedLM "
                        "folder or hub name, or use minilm-mlm") from None
    head_missing = [k for k in info.get("missing_keys", ()) if "embeddings" not in k]
    if head_missing:
        raise UserError(f"tinybert.mlm: {name!r} has no trained masked-LM head (missing {sorted(head_missing)[:3]}...); "
                        "use minilm-mlm to build one offline")
    if tokenizer.mask_token_id is None:
        raise UserError(f"tinybert.mlm: the tokenizer of {name!r} has no mask token")
    model.eval()
    path = Path(name)
    identity = f"{path.name}:{sha256_tree(path)[:16]}" if path.is_dir() else name
    return model, tokenizer, identity
