"""Small-BERT student: k transformer layers sharing the teacher's tokenizer.

init="copy" (PKD/DistilBERT style): the architecture of `source` (a teacher-compatible HF
checkpoint folder, or "minilm") with k layers; embeddings and the chosen source layers'
weights are copied (a pooler too when the source has one), the classifier is new.
  layers="first"       -> source layers 1..k
  layers="every_other" -> source layers 1, 3, ..., 2k-1 (DistilBERT-style, from the bottom)
  layers=[l1, ...]     -> those 1-based source layers, in that order
init="scratch": a fresh BertConfig (hidden/layers/heads/intermediate; TinyBERT4-like
defaults 312/4/12/1200) over the source tokenizer's vocabulary.
project_to=d_T (!= d_S) adds projections "emb", "hid": Linear(d_S, d_T) for TinyBERT.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data.assets import resolve_model
from data.config import from_dict
from data.io import UserError, quiet_transformers
from pipeline.attention_capture import AttentionCapture
from pipeline.cache_schema import segment_ids
from trainer.losses.types import StudentOutput
from trainer.students._word import check_want

_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


@dataclass
class SmallBertConfig:
    num_labels: int = 2
    source: str = "minilm"  # teacher-compatible HF folder (tokenizer; weights when init="copy")
    init: str = "copy"  # "copy" | "scratch"
    layers: str | list[int] = "first"  # copy: "first" | "every_other" | 1-based source layers
    num_layers: int = 2  # k for first/every_other, and the depth of a scratch model
    hidden_size: int = 312  # scratch only
    num_heads: int = 12  # scratch only
    intermediate_size: int = 1200  # scratch only
    project_to: int | None = None  # teacher width d_T: adds Linear(d_S, d_T) "emb"/"hid" if != d_S
    max_length: int = 128  # encode_texts truncation (WordPiece tokens)
    source_layers: list[int] | None = None  # filled in: the 1-based source layer of each student layer
    hf_config: dict | None = None  # filled in: the student's HF config (enough to rebuild it)


def pick_layers(layers, k: int, n_source: int) -> list[int]:
    """1-based source layers for the student's k layers."""
    if isinstance(layers, str) and layers not in ("first", "every_other"):
        layers = [int(x) for x in layers.split(",") if x.strip()]
    if layers == "first":
        chosen = list(range(1, k + 1))
    elif layers == "every_other":
        chosen = list(range(1, 2 * k, 2))
    else:
        chosen = [int(x) for x in layers]
    if not chosen or any(not 1 <= l <= n_source for l in chosen):
        raise UserError(f"student layers {layers!r} (k={k}) do not fit a {n_source}-layer source: got {chosen}")
    return chosen


def _source_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The source's base-model state dict (no `prefix.`, no task heads) read from safetensors,
    or from an HF load when the folder holds none."""
    from safetensors.torch import load_file

    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    index = path / "model.safetensors.index.json"
    if not files and index.is_file():
        files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
    else:
        from transformers import AutoModel

        try:
            sd = AutoModel.from_pretrained(str(path)).state_dict()
        except OSError as e:
            raise UserError(f"cannot read weights of {path}: {str(e).splitlines()[0]}") from None
    if any(k.startswith(prefix + ".") for k in sd):
        sd = {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    return sd


class SmallBertStudent(nn.Module):
    """HF *ForSequenceClassification model + optional projections.

    Batch: input_ids (B, L), attention_mask (B, L), optional token_type_ids (the teacher's
    WordPiece ids from the cache, or encode_texts()). `self.source_layers[i-1]` is the source
    layer student layer i came from (copy init), for layer maps.
    """

    kind = "smallbert"
    config_class = SmallBertConfig
    reads_teacher_ids = True  # trains on the cache's input_ids: its tokenizer must be the teacher's
    offers = frozenset({"hidden", "attention", "values"})
    default_lr = 1e-4  # peak of the linear decay: +0.4 test over 5e-5 with hinton on Tang rows (docs/methods.md)

    def __init__(self, cfg: SmallBertConfig, tokenizer):
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        quiet_transformers()
        self.config = cfg
        self.tokenizer = tokenizer
        hf = AutoConfig.for_model(**cfg.hf_config)
        self.model = AutoModelForSequenceClassification.from_config(hf)
        d_s = hf.hidden_size
        self.projections = None
        if cfg.project_to and cfg.project_to != d_s:
            self.projections = nn.ModuleDict({n: nn.Linear(d_s, cfg.project_to) for n in ("emb", "hid")})
        self.source_layers = cfg.source_layers
        self._token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters
        self.label_names: list[str] | None = None

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @classmethod
    def from_config(cls, cfg, vocab=None, tokenizer=None, init_weights: bool = True) -> "SmallBertStudent":
        """Build from a SmallBertConfig or dict. Without cfg.hf_config the architecture is
        derived from cfg.source; with init_weights and init="copy" the chosen source layers
        are copied. `tokenizer` defaults to the source's. `vocab` is unused (word students)."""
        from transformers import AutoConfig, AutoTokenizer, BertConfig

        quiet_transformers()
        cfg = from_dict(SmallBertConfig, cfg) if isinstance(cfg, dict) else dataclasses.replace(cfg)
        if cfg.init not in ("copy", "scratch"):
            raise ValueError(f"init must be 'copy' or 'scratch', got {cfg.init!r}")
        need_source = cfg.hf_config is None or tokenizer is None or (init_weights and cfg.init == "copy")
        path = Path(resolve_model(cfg.source)) if need_source else None
        if need_source and not path.is_dir():
            raise UserError(f"small-BERT source {cfg.source!r} is not a model folder: {path}")
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        if cfg.hf_config is None:
            src = AutoConfig.from_pretrained(str(path))
            if cfg.init == "copy":
                cfg.source_layers = pick_layers(cfg.layers, cfg.num_layers, src.num_hidden_layers)
                hf = AutoConfig.from_pretrained(str(path), num_hidden_layers=len(cfg.source_layers))
            else:
                cfg.source_layers = None
                hf = BertConfig(
                    vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                    max_position_embeddings=getattr(src, "max_position_embeddings", 512),
                    type_vocab_size=max(1, getattr(src, "type_vocab_size", 2)),
                    pad_token_id=tokenizer.pad_token_id or 0,
                )
            hf.num_labels = cfg.num_labels
            cfg.hf_config = hf.to_dict()
        model = cls(cfg, tokenizer)
        if init_weights and cfg.init == "copy":
            model.copy_source_weights(path)
        return model

    @classmethod
    def for_run(cls, params: dict, inputs) -> "SmallBertStudent":
        """The student of `params`, tokenising as the cache's teacher did: it takes the cache's tokenizer (saved
        with it, so `predict` reads text as the teacher did) and its max_length, and is refused when its source's
        vocabulary is not the teacher's (cached ids would name other tokens)."""
        cache = inputs.cache
        params = {"max_length": cache.manifest.max_length, **params}
        model = cls.from_config(params)
        if cache.tokenizer_dir is not None:
            from transformers import AutoTokenizer

            model.check_tokenizer(AutoTokenizer.from_pretrained(str(cache.tokenizer_dir)), cache.dir)
            return model
        # a cache built before caches carried their tokenizer, its teacher folder not on this machine
        vocab_size = model.config.hf_config.get("vocab_size")
        ids = cache.row_table(inputs.sets, ["input_ids"]).column("input_ids").to_pylist()
        max_id = max((max(row) for row in ids if row), default=0)
        if max_id >= vocab_size:
            raise UserError(f"small-BERT student: its tokenizer has {vocab_size} ids but the cache holds id {max_id}: "
                            "a small-BERT student must share the teacher's tokenizer")
        print(f"note: cache {cache.dir} has no tokenizer/ and its teacher folder is not here: the student keeps "
              f"the tokenizer of {model.config.source}, unchecked against the teacher's")
        return model

    @classmethod
    def from_saved(cls, folder, config: dict) -> "SmallBertStudent":
        from transformers import AutoTokenizer

        return cls.from_config(config, tokenizer=AutoTokenizer.from_pretrained(str(folder)), init_weights=False)

    def save_encoder(self, folder) -> None:
        self.tokenizer.save_pretrained(str(folder))

    def copy_source_weights(self, path: Path) -> None:
        """Embeddings, non-layer encoder weights and the chosen layers from the source."""
        base = self.model.base_model
        sd = _source_weights(Path(path), self.model.base_model_prefix)
        mapped = {}
        for key, value in sd.items():
            m = _LAYER_KEY.match(key)
            if m is None:
                mapped[key] = value
                continue
            for i, src in enumerate(self.config.source_layers):  # a source layer may be listed twice
                if src == int(m.group(1)) + 1:
                    mapped[f"encoder.layer.{i}.{m.group(2)}"] = value
        expected = base.state_dict()
        missing = [k for k in expected if k not in mapped and not k.startswith("pooler.")]
        if missing:
            raise UserError(f"{path}: source lacks {len(missing)} student weights, e.g. {missing[:3]}")
        # one source layer may feed two student layers (a list with repeats): copy tensors apart
        base.load_state_dict({k: v.clone() for k, v in mapped.items() if k in expected}, strict=False)

    def check_tokenizer(self, teacher_tokenizer, cache_dir) -> None:
        """Take the teacher's tokenizer when its vocabulary is this student's; else UserError naming both."""
        if teacher_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise UserError(f"small-BERT student: the vocabulary of its source {self.config.source!r} "
                            f"({len(self.tokenizer)} ids) is not the teacher's in {cache_dir}/tokenizer "
                            f"({len(teacher_tokenizer)} ids): cached input_ids would name other tokens; use "
                            "student_params.source=<a model with the teacher's tokenizer, e.g. the teacher folder>")
        self.tokenizer = teacher_tokenizer

    # ---------------------------------------------------------------- inputs
    def encode_texts(self, texts, texts_b=None) -> dict:
        """Raw strings -> input_ids / attention_mask (/ token_type_ids), as the teacher would."""
        texts = [t or "" for t in texts]
        texts_b = [t or "" for t in texts_b] if texts_b is not None else None
        return dict(self.tokenizer(texts, texts_b, padding=True, truncation=True,
                                   max_length=self.config.max_length, return_tensors="pt"))

    # ---------------------------------------------------------------- forward
    def forward(self, batch: dict, want: frozenset = frozenset()) -> StudentOutput:
        """want: "hidden" -> hidden_states (k+1 entries, index 0 = embeddings); "attention"
        -> pre-softmax scores of layers 1..k (no mask added); "values" -> layer k's values."""
        want = check_want(want)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if self._token_types:  # cached batches carry no token types: derive them as the teacher did
            types = batch.get("token_type_ids")
            kwargs["token_type_ids"] = types if types is not None else segment_ids(ids, self.tokenizer.sep_token_id)
        k = self.num_layers
        cap = contextlib.nullcontext()
        if "attention" in want or "values" in want:
            cap = AttentionCapture(self.model, layers=range(1, k + 1) if "attention" in want else (),
                                   values_layer=k if "values" in want else None)
        with cap:
            out = self.model(**kwargs, output_hidden_states="hidden" in want)
        return StudentOutput(
            logits=out.logits,
            hidden_states=list(out.hidden_states) if "hidden" in want else None,
            attentions=dict(cap.scores) if "attention" in want else None,
            values=cap.values if "values" in want else None,
            mask=mask.bool(),
            projections=self.projections,
        )
