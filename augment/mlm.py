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

from data.io import UserError, atomic_replace_dir, atomic_write_text, quiet_transformers, sha256_tree

META = "distil_mlm.json"


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


def _masked_states(model, tokenizer, texts: list[str], gen, max_length: int = 128, batch: int = 64):
    """Encoder states at masked positions (frozen encoder: computed once, reused every step)."""
    import torch

    enc = tokenizer(texts, truncation=True, max_length=max_length)
    special_ids = torch.tensor(tokenizer.all_special_ids)
    states, labels = [], []
    for s in range(0, len(texts), batch):
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in enc["input_ids"][s : s + batch]],
                                              batch_first=True, padding_value=tokenizer.pad_token_id)
        att = (ids != tokenizer.pad_token_id).long()
        inp, lab = _mask_batch(ids, torch.isin(ids, special_ids), tokenizer.mask_token_id, model.config.vocab_size, gen)
        with torch.inference_mode():
            hidden = model.bert(input_ids=inp, attention_mask=att).last_hidden_state
        sel = lab != -100
        states.append(hidden[sel].clone())
        labels.append(lab[sel])
    return torch.cat(states), torch.cat(labels)


def train_head(model, tokenizer, texts: list[str], *, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    """Fit the prediction head (transform + output bias) on a frozen encoder; returns the loss curve.

    The decoder stays tied to the word embeddings. Masked states are computed once, so a
    step costs one head forward/backward: the whole build takes a minute or two on CPU.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    model.eval()
    states, labels = _masked_states(model, tokenizer, texts, gen)
    head = model.cls.predictions
    for p in model.parameters():
        p.requires_grad_(False)
    params = [*head.transform.parameters(), head.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve = []
    for _ in range(steps):
        idx = torch.randint(len(labels), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model.cls(states[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(round(loss.item(), 4))
    for p in model.parameters():
        p.requires_grad_(False)
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
    curve = train_head(model, tokenizer, texts[: meta["texts"]], steps=meta["steps"], batch=meta["batch"],
                       lr=meta["lr"], seed=meta["seed"])
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = dict(meta, loss_first=curve[:5], loss_last=curve[-5:], train_seconds=round(time.perf_counter() - t0, 1))
    atomic_write_text(tmp / META, json.dumps(info, indent=2))
    atomic_replace_dir(tmp, folder)


def ensure_minilm_mlm(mlm_dir: str | Path, texts: list[str], corpus_fingerprint: str, *, steps: int, batch: int,
                      lr: float, layers: int, n_texts: int, seed: int, log=print) -> Path:
    """The minilm-mlm folder for this corpus and recipe: reused when its metadata matches."""
    from data.assets import minilm_path

    folder = Path(mlm_dir) / ("minilm-mlm" if not layers else f"minilm-mlm-l{layers}")
    meta = {"base": "all-MiniLM-L6-v2", "base_path": str(minilm_path()), "corpus_fingerprint": corpus_fingerprint,
            "steps": steps, "batch": batch, "lr": lr, "layers": layers, "texts": n_texts, "seed": seed}
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


def load_mlm(name: str, identify: bool = True):
    """(model, tokenizer, identity) for any AutoModelForMaskedLM folder or hub name.

    The identity of a local folder is a checksum of its files (skipped with identify=False).
    """
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
    identity = f"{path.name}:{sha256_tree(path)[:16]}" if path.is_dir() and identify else name
    return model, tokenizer, identity


def _bert_layers(model):
    """The encoder layers when they are plain BERT layers (absolute positions, no decoder)."""
    cfg = model.config
    if getattr(cfg, "model_type", "") != "bert" or getattr(cfg, "is_decoder", False):
        return None
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return None
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    need = ("attention", "intermediate", "output")
    return layers if layers is not None and len(layers) >= 1 and all(hasattr(layers[-1], a) for a in need) else None


class BatchedMLM:
    """Top-K MLM predictions for many (sentence, masked piece) items in few forwards.

    Each item becomes `[CLS] pieces-with-[MASK] [SEP] pieces [SEP]` (the reference's
    input; the tokenizer's own pair template for other models). Items are sorted by
    length and padded per batch; only the masked position's hidden state goes through
    the prediction head. Results do not depend on which items share a batch (padding is
    masked out), up to float noise. Inputs go to the model's device (CPU or a GPU); the
    top-K ids come back to the CPU.
    """

    def __init__(self, model, tokenizer, *, batch: int = 256, max_length: int = 512, drop_special: bool = True):
        self.model, self.tok, self.batch = model, tokenizer, batch
        self.max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length) or max_length)
        m = tokenizer.mask_token_id
        enc = tokenizer(tokenizer.mask_token, tokenizer.mask_token, return_token_type_ids=True)
        ids, types = enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])
        i1 = ids.index(m)
        i2 = ids.index(m, i1 + 1)
        self.prefix, self.middle, self.suffix = ids[:i1], ids[i1 + 1 : i2], ids[i2 + 1 :]
        self.types = (types[:i1], types[i1], types[i1 + 1 : i2], types[i2], types[i2 + 1 :])
        self.use_types = getattr(model.config, "type_vocab_size", 0) > 1
        self.drop = set(tokenizer.all_special_ids) if drop_special else set()
        self.head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
        self.bert_like = _bert_layers(model) is not None and self.head is not None
        self._strings: dict[int, str | None] = {}

    def build(self, pieces: list[int], pos: int) -> tuple[list[int], list[int], int] | None:
        """Input ids, token types and mask index for one item; None when the mask cannot fit."""
        fixed = len(self.prefix) + len(self.middle) + len(self.suffix)
        budget = self.max_length - fixed
        a = list(pieces)
        a[pos] = self.tok.mask_token_id
        if len(a) > budget:
            if pos >= budget:
                return None
            a = a[:budget]
        b = list(pieces[: budget - len(a)])
        pre_t, a_t, mid_t, b_t, suf_t = self.types
        ids = self.prefix + a + self.middle + b + self.suffix
        types = pre_t + [a_t] * len(a) + mid_t + [b_t] * len(b) + suf_t
        return ids, types, len(self.prefix) + pos

    def _string(self, i: int) -> str | None:
        """A vocabulary entry as a word; None for subword continuations and dropped specials."""
        if i not in self._strings:
            tok = self.tok.convert_ids_to_tokens(i)
            ok = i not in self.drop and not tok.startswith("##")  # the reference drops "##" pieces
            self._strings[i] = self.tok.convert_tokens_to_string([tok]).strip() if ok else None
        return self._strings[i]

    def masked_states(self, ids, att, pos, kw: dict):
        """Final hidden states at the masked positions only (BERT-style encoders).

        All layers but the last run as usual; the last needs keys/values of every token
        but queries, attention output and feed-forward only at the mask: the same numbers
        (up to float noise) for about 1/6 less work on a 6-layer encoder.
        """
        import torch

        base = self.model.base_model
        layers = base.encoder.layer
        base.encoder.layer = layers[:-1]
        try:
            h = base(input_ids=ids, attention_mask=att, **kw)[0]
        finally:
            base.encoder.layer = layers
        last, cfg = layers[-1], self.model.config
        b, n, _ = h.shape
        heads = cfg.num_attention_heads
        dh = cfg.hidden_size // heads
        sa = last.attention.self
        x = h[torch.arange(b, device=h.device), pos]
        q = sa.query(x).view(b, heads, 1, dh)
        k = sa.key(h).view(b, n, heads, dh).transpose(1, 2)
        v = sa.value(h).view(b, n, heads, dh).transpose(1, 2)
        bias = (1.0 - att[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).reshape(b, heads * dh)
        a = last.attention.output(ctx, x)
        return last.output(last.intermediate(a), a)

    def topk(self, items: list[tuple[list[int], int]], k: int) -> list[list[str] | None]:
        """Per item: the words among the top-K predictions (best first), or None if it cannot fit."""
        import torch

        built = [self.build(p, i) for p, i in items]
        out: list[list[str] | None] = [None] * len(items)
        order = sorted((i for i, b in enumerate(built) if b is not None), key=lambda i: (len(built[i][0]), i))
        pad = self.tok.pad_token_id or 0
        dev = next(self.model.parameters()).device
        with torch.inference_mode():
            for s in range(0, len(order), self.batch):
                group = order[s : s + self.batch]
                width = max(len(built[i][0]) for i in group)
                ids = torch.full((len(group), width), pad, dtype=torch.long)
                types = torch.zeros((len(group), width), dtype=torch.long)
                att = torch.zeros((len(group), width), dtype=torch.long)
                for r, i in enumerate(group):
                    x, t, _ = built[i]
                    ids[r, : len(x)] = torch.tensor(x)
                    types[r, : len(t)] = torch.tensor(t)
                    att[r, : len(x)] = 1
                ids, types, att = ids.to(dev), types.to(dev), att.to(dev)
                pos = torch.tensor([built[i][2] for i in group], device=dev)
                kw = {"token_type_ids": types} if self.use_types else {}
                rows = torch.arange(len(group), device=dev)
                if self.bert_like:
                    logits = self.head(self.masked_states(ids, att, pos, kw))
                elif self.head is not None:
                    hidden = self.model.base_model(input_ids=ids, attention_mask=att, **kw)[0]
                    logits = self.head(hidden[rows, pos])
                else:  # an MLM class without a known head attribute: full logits, then gather
                    logits = self.model(input_ids=ids, attention_mask=att, **kw).logits[rows, pos]
                top = torch.topk(logits.float(), k, dim=-1).indices.cpu().tolist()
                for r, i in enumerate(group):
                    out[i] = [w for w in (self._string(j) for j in top[r]) if w]
        return out
