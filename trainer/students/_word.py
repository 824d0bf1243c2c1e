"""Shared parts of the word-level students (BiLSTM, TextCNN): embeddings, pairs, batches.

A subclass implements `_sentence(ids, lengths, hidden) -> (vector (B, d), hidden list | None)`
and calls `_build_head(d, ...)`, where d is the width of its sentence vector and (unless `token_dim` says
otherwise) of its top token states. With `config.project_to` set (the teacher width d_T), `_build_head` also adds
`projections["pkd"] = Linear(token width, d_T)`: the learned map PKD / dynakd_supervision use to compare
the student's (masked-mean) token states with the teacher's [CLS] states.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from data.config import from_dict
from trainer.losses.types import StudentOutput
from trainer.vocab import Vocab, load_embeddings

VOCAB_FILE = "vocab.json"
WANT = frozenset({"hidden", "attention", "values"})


@dataclass
class WordConfig:
    """The settings every word student has; BiLSTMConfig and TextCNNConfig add their encoder's."""

    num_labels: int = 2
    vocab_size: int = 0  # filled from the Vocab
    embed_dim: int = 50  # filled from the vectors when they are loaded
    embeddings: str | None = "glove50"  # "glove50" | word2vec/GloVe file | None (random)
    freeze_embeddings: bool = False
    mlp_hidden: int = 0  # ReLU layer of the head (0 = a linear head)
    dropout: float = 0.1  # on the sentence features and the MLP's hidden layer
    pair: bool = False  # sentence-pair task: batches carry word_ids_b / word_lengths_b
    max_len: int | None = None  # encode_texts truncation (words)
    seed: int = 0  # random rows of words missing from the vectors
    project_to: int | None = None  # teacher width d_T: adds projections["pkd"] (PKD on this student)


def lengths_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B, L) bool: position < length."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def pair_features(u: Tensor, v: Tensor) -> Tensor:
    """[u; v; u∘v; |u−v|] (InferSent / Tang et al. sentence-pair features)."""
    return torch.cat([u, v, u * v, (u - v).abs()], dim=-1)


def check_want(want) -> frozenset:
    want = frozenset(want)
    if not want <= WANT:
        raise ValueError(f"unknown `want` items {sorted(want - WANT)}; allowed: {sorted(WANT)}")
    return want


class WordStudent(nn.Module):
    """Base: nn.Embedding (padding_idx 0) + a sentence encoder + a classifier head."""

    kind = "word"
    config_class: type = object
    reads_teacher_ids = False  # batches are encoded from the text with the student's own vocabulary
    offers = frozenset({"hidden"})
    default_lr = 1e-3

    def __init__(self, cfg, vocab: Vocab | None = None, embeddings: Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.vocab = vocab
        self.label_names: list[str] | None = None
        self.projections: nn.ModuleDict | None = None
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=Vocab.pad_id)
        if embeddings is not None:
            if tuple(embeddings.shape) != (cfg.vocab_size, cfg.embed_dim):
                raise ValueError(f"embeddings {tuple(embeddings.shape)} != ({cfg.vocab_size}, {cfg.embed_dim})")
            with torch.no_grad():
                self.embedding.weight.copy_(embeddings)
        self.embedding.weight.requires_grad_(not cfg.freeze_embeddings)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: Any, vocab: Vocab | None = None, embeddings: Tensor | None = None,
                    init_weights: bool = True) -> "WordStudent":
        """Build from a config (dataclass or dict). With init_weights, the embedding matrix
        is read from `cfg.embeddings` ("glove50" or a vector file) unless `embeddings` (a
        (V, d) tensor) is passed; vocab_size/embed_dim are filled in from vocab/vectors."""
        cfg = from_dict(cls.config_class, cfg) if isinstance(cfg, dict) else dataclasses.replace(cfg)
        if vocab is not None:
            if cfg.vocab_size and cfg.vocab_size != len(vocab):
                raise ValueError(f"config vocab_size {cfg.vocab_size} != len(vocab) {len(vocab)}")
            cfg.vocab_size = len(vocab)
        if not cfg.vocab_size:
            raise ValueError(f"{cls.__name__}: pass a Vocab or set vocab_size")
        if init_weights and embeddings is None and cfg.embeddings:
            if vocab is None:
                raise ValueError(f"{cls.__name__}: initialising embeddings from {cfg.embeddings!r} needs the Vocab")
            embeddings, _ = load_embeddings(vocab, cfg.embeddings, seed=cfg.seed)
        if init_weights and embeddings is not None:
            cfg.embed_dim = int(embeddings.shape[1])
        return cls(cfg, vocab=vocab, embeddings=embeddings if init_weights else None)

    @classmethod
    def for_run(cls, params: dict, inputs) -> "WordStudent":
        """A vocabulary from the run's training texts (a word without a vector needs `oov_min_freq` occurrences in
        the rows before augmentation), the pretrained rows of its words, and the student on top."""
        from data.vectors import load_vectors

        cfg = inputs.train
        rows = inputs.cache.row_table(inputs.sets, ["set", "text", "text_b"])
        a, b, in_set = (rows.column(c).to_pylist() for c in ("text", "text_b", "set"))
        params = {"pair": any(b), **params}
        original = [t for t, s in zip(a + b, in_set * 2) if t and not s.startswith("aug-")]  # before augmentation
        vectors = load_vectors(cfg.embeddings, "embeddings")
        vocab = Vocab.build(a + [t for t in b if t], min_freq=cfg.min_freq, pretrained=vectors.key_to_index,
                            oov_min_freq=cfg.oov_min_freq, original=original)
        embeddings, missing = load_embeddings(vocab, vectors, oov_std=cfg.oov_std)
        print(f"{cls.kind}: vocabulary {len(vocab)} words, {missing} without a pretrained vector")
        return cls.from_config(params, vocab=vocab, embeddings=embeddings)

    @classmethod
    def from_saved(cls, folder, config: dict) -> "WordStudent":
        vocab = Vocab.load(folder / VOCAB_FILE) if (folder / VOCAB_FILE).is_file() else None
        return cls.from_config(config, vocab=vocab, init_weights=False)

    def save_encoder(self, folder) -> None:
        if self.vocab is not None:
            self.vocab.save(folder / VOCAB_FILE)

    def _build_head(self, feature_dim: int, mlp_hidden: int, dropout: float, token_dim: int | None = None) -> None:
        """token_dim: the width of the top token states when it differs from the sentence vector's."""
        cfg = self.config
        in_dim = 4 * feature_dim if cfg.pair else feature_dim
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if mlp_hidden:
            layers += [nn.Linear(in_dim, mlp_hidden), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = mlp_hidden
        layers.append(nn.Linear(in_dim, cfg.num_labels))
        self.head = nn.Sequential(*layers)
        project_to = getattr(cfg, "project_to", None)
        if project_to:  # created after the head: students without it keep their seeded init
            self.projections = nn.ModuleDict({"pkd": nn.Linear(token_dim or feature_dim, int(project_to))})

    # ---------------------------------------------------------------- inputs
    def encode_texts(self, texts, texts_b=None) -> dict:
        """Raw strings -> the batch dict forward() takes (word_ids, word_lengths[, _b])."""
        if self.vocab is None:
            raise ValueError(f"{type(self).__name__} has no Vocab attached: cannot encode raw text")
        ids, lengths = self.vocab.encode(list(texts), max_len=self.config.max_len)
        batch = {"word_ids": ids, "word_lengths": lengths}
        if self.config.pair:
            if texts_b is None:
                raise ValueError("this student was built for sentence pairs: pass texts_b")
            ids_b, lengths_b = self.vocab.encode(list(texts_b), max_len=self.config.max_len)
            batch.update(word_ids_b=ids_b, word_lengths_b=lengths_b)
        return batch

    # ---------------------------------------------------------------- forward
    def _sentence(self, ids: Tensor, lengths: Tensor, hidden: bool) -> tuple[Tensor, list[Tensor] | None]:
        raise NotImplementedError

    def forward(self, batch: dict, want: frozenset = frozenset()) -> StudentOutput:
        """Logits (and `pooled` = the classifier's input features) for single sentences or
        pairs. want={"hidden"}: hidden_states per encoder stage, (B, L, d_stage); for pairs
        the two sentences' states are concatenated along L (and so is `mask`).
        "attention"/"values" have no meaning here and are ignored."""
        hidden = "hidden" in check_want(want)
        ids, lengths = batch["word_ids"], batch["word_lengths"].to(batch["word_ids"].device)
        u, hid = self._sentence(ids, lengths, hidden)
        mask = lengths_mask(lengths, ids.size(1))
        if self.config.pair:
            if "word_ids_b" not in batch:
                raise KeyError("pair student: batch lacks word_ids_b / word_lengths_b")
            ids_b, lengths_b = batch["word_ids_b"], batch["word_lengths_b"].to(ids.device)
            v, hid_b = self._sentence(ids_b, lengths_b, hidden)
            feats = pair_features(u, v)
            mask = torch.cat([mask, lengths_mask(lengths_b, ids_b.size(1))], dim=1)
            if hidden:
                hid = [torch.cat([a, b], dim=1) for a, b in zip(hid, hid_b)]
        else:
            feats = u
        return StudentOutput(logits=self.head(feats), hidden_states=hid if hidden else None, mask=mask, pooled=feats,
                             projections=self.projections)
