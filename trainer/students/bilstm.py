"""Tang et al. 2019 distilled BiLSTM student.

Embeddings (GloVe-initialised, trainable) -> 1-layer BiLSTM over packed sequences ->
sentence vector (last states of both directions, or max over time) -> for pairs
[u; v; u∘v; |u−v|] with a shared encoder -> ReLU MLP (one hidden layer) -> K logits.
Defaults follow the paper's SST-2 model: 150 units per direction (a 300-d sentence
vector), a 200-unit ReLU layer; the paper used 300/400 for sentence-pair tasks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from trainer.students._word import WordConfig, WordStudent, lengths_mask


@dataclass
class BiLSTMConfig(WordConfig):
    hidden_size: int = 150  # per direction: the sentence vector is 2x this
    mlp_hidden: int = 200
    pooling: str = "max"  # "max" (over time: +4 points on tweets, docs/methods.md) | "last" (final states, Tang)


class BiLSTMStudent(WordStudent):
    """want={"hidden"}: hidden_states = [token embeddings (B,L,E), BiLSTM outputs (B,L,2H)]."""

    kind = "bilstm"
    config_class = BiLSTMConfig
    default_lr = 2e-3  # peak of the linear decay: +1.3 over 1e-3 on plain runs, level on distilled (docs/methods.md)

    def __init__(self, cfg: BiLSTMConfig, vocab=None, embeddings: Tensor | None = None):
        super().__init__(cfg, vocab, embeddings)
        if cfg.pooling not in ("last", "max"):
            raise ValueError(f"pooling must be 'last' or 'max', got {cfg.pooling!r}")
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_size, num_layers=1, batch_first=True, bidirectional=True)
        self._build_head(2 * cfg.hidden_size, cfg.mlp_hidden, cfg.dropout)

    def _sentence(self, ids: Tensor, lengths: Tensor, hidden: bool):
        emb = self.embedding(ids)
        lengths = lengths.clamp(min=1)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        if self.config.pooling == "last":
            vec = torch.cat([h_n[0], h_n[1]], dim=-1)  # forward's last step, backward's first
            if not hidden:
                return vec, None
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))
        if self.config.pooling == "max":
            valid = lengths_mask(lengths, ids.size(1))[..., None]
            vec = out.masked_fill(~valid, float("-inf")).max(dim=1).values
        return vec, ([emb, out] if hidden else None)
