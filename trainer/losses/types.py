"""What every student's forward returns (the contract between students and losses)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class StudentOutput:
    logits: Tensor                      # (B, K)
    hidden_states: list[Tensor] | None = None   # index 0 = embedding output, i = layer i, each (B, L, d_S)
    attentions: dict[int, Tensor] | None = None # 1-based layer -> pre-softmax scores (B, H, L, L), no mask added
    values: Tensor | None = None        # last layer value vectors (B, L, d_S), heads concatenated
    mask: Tensor | None = None          # (B, L) bool valid tokens
    pooled: Tensor | None = None        # (B, d) sentence vector (non-BERT students)
    projections: nn.ModuleDict | None = None  # learned projections (e.g. W_h d_S->d_T) owned by the student
