"""Tang et al. 2019 distilled BiLSTM student.

Embeddings (GloVe-initialised, trainable) -> BiLSTM (1 layer, Tang's) over packed sequences ->
sentence vector (last states of both directions, max over time, or max and mean over time) -> for pairs
[u; v; u∘v; |u−v|] with a shared encoder -> ReLU MLP (one hidden layer) -> K logits.
Sizes follow the paper's SST-2 model: 150 units per direction, a 200-unit ReLU layer (the paper used
300/400 for sentence-pair tasks); the default pooling, max and mean, makes the sentence vector 600-d.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from trainer.losses.common import masked_mean
from trainer.students._word import WordConfig, WordStudent, lengths_mask


POOLINGS = ("max", "last", "max_mean")


@dataclass
class BiLSTMConfig(WordConfig):
    hidden_size: int = 150  # per direction: the sentence vector is 2x this
    mlp_hidden: int = 200
    # "max_mean": max and mean over time, concatenated (a sentence vector of 4x hidden_size; +0.4 on the distilled
    # BiLSTM, docs/methods.md) | "max" (over time: +4 points over "last" on tweets) | "last" (final states, Tang)
    pooling: str = "max_mean"
    num_layers: int = 1  # stacked BiLSTM layers (dropout between them)


class BiLSTMStudent(WordStudent):
    """want={"hidden"}: hidden_states = [token embeddings (B,L,E), BiLSTM outputs (B,L,2H)]."""

    kind = "bilstm"
    config_class = BiLSTMConfig
    default_lr = 2e-3  # peak of the linear decay: +1.3 over 1e-3 on plain runs, level on distilled (docs/methods.md)

    def __init__(self, cfg: BiLSTMConfig, vocab=None, embeddings: Tensor | None = None):
        super().__init__(cfg, vocab, embeddings)
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {cfg.pooling!r}")
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True,
                            bidirectional=True, dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        width = (4 if cfg.pooling == "max_mean" else 2) * cfg.hidden_size
        self._build_head(width, cfg.mlp_hidden, cfg.dropout, token_dim=2 * cfg.hidden_size)

    def _sentence(self, ids: Tensor, lengths: Tensor, hidden: bool):
        emb = self.embedding(ids)
        lengths = lengths.clamp(min=1)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        if self.config.pooling == "last":
            vec = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # top layer: forward's last step, backward's first
            if not hidden:
                return vec, None
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))
        if self.config.pooling != "last":
            valid = lengths_mask(lengths, ids.size(1))
            vec = out.masked_fill(~valid[..., None], float("-inf")).max(dim=1).values
            if self.config.pooling == "max_mean":
                vec = torch.cat([vec, masked_mean(out, valid)], dim=-1)
        return vec, ([emb, out] if hidden else None)
