"""Kim 2014 CNN student: filter widths 1–5 x 200 maps, ReLU, max over time, dropout 0.2.

Kim's network is widths 3/4/5 x 100 maps, dropout 0.5 and a linear head (`widths: [3, 4, 5]`,
`num_filters: 100`, `dropout: 0.5`, `mlp_hidden: 0`); the defaults are what measured best
distilled on tweets with 50-d GloVe (docs/methods.md): a ReLU layer of 200 before the output
(74.8 -> 75.9 test), then unigram and bigram filters, more maps and lighter dropout (76.1 -> 77.4).
Inputs shorter than the widest filter are right-padded with <pad> (a zero row); windows
that start past a sentence's last full window are masked out of the max, so the result
does not depend on how much padding the batch has (a sentence shorter than a filter keeps
its first window). Pairs: shared encoder, [u; v; u∘v; |u−v|]. Kim's max-norm constraint is not applied.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.students._word import WordConfig, WordStudent


@dataclass
class TextCNNConfig(WordConfig):
    widths: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])  # Kim: [3, 4, 5]
    num_filters: int = 200  # feature maps per width (Kim: 100)
    mlp_hidden: int = 200  # a ReLU layer before the output: +1.1 distilled on tweets (docs/methods.md); 0 = Kim's linear head
    dropout: float = 0.2  # Kim: 0.5


class TextCNNStudent(WordStudent):
    """want={"hidden"}: hidden_states = [token embeddings (B,L,E), feature maps (B,L,W·F)]
    where position t holds each width's ReLU output for the window starting at t (0 where
    no window of that width starts)."""

    kind = "textcnn"
    config_class = TextCNNConfig

    def __init__(self, cfg: TextCNNConfig, vocab=None, embeddings: Tensor | None = None):
        super().__init__(cfg, vocab, embeddings)
        if not cfg.widths or min(cfg.widths) < 1:
            raise ValueError(f"widths must be positive, got {cfg.widths}")
        self.convs = nn.ModuleList(nn.Conv1d(cfg.embed_dim, cfg.num_filters, w) for w in cfg.widths)
        self._build_head(len(cfg.widths) * cfg.num_filters, cfg.mlp_hidden, cfg.dropout)

    def _sentence(self, ids: Tensor, lengths: Tensor, hidden: bool):
        L = ids.size(1)
        widest = max(self.config.widths)
        if L < widest:
            ids = F.pad(ids, (0, widest - L), value=0)
        emb = self.embedding(ids)  # (B, L', E)
        x = emb.transpose(1, 2)
        lengths = lengths.clamp(min=1)
        pooled, maps = [], []
        for width, conv in zip(self.config.widths, self.convs):
            c = torch.relu(conv(x))  # (B, F, L'-w+1)
            n_windows = (lengths - width + 1).clamp(min=1)
            valid = torch.arange(c.size(2), device=c.device)[None, :] < n_windows[:, None]
            c = c.masked_fill(~valid[:, None, :], 0.0)  # ReLU output >= 0: zeros never win the max
            pooled.append(c.max(dim=2).values)
            if hidden:
                maps.append(F.pad(c, (0, emb.size(1) - c.size(2)))[:, :, :L].transpose(1, 2))
        vec = torch.cat(pooled, dim=-1)
        return vec, ([emb[:, :L], torch.cat(maps, dim=-1)] if hidden else None)
