"""int8 token-level fields (`cache.quantize: int8`): symmetric absmax quantisation with fp16 scales.

Hidden states and values get one scale per token vector (the last axis); attention scores one per row's block of
each layer and head, so a row's softmax sees one step size. float ≈ int8 × scale; the error is at most half a
step, scale / 2 = absmax / 254 of the vector or block. Values stay in [-127, 127]: -128 marks a lost chunk.
The teacher side quantises (torch tensors, on the GPU when there is one); readers dequantise with numpy only.
"""
from __future__ import annotations

import numpy as np


def quantize(x, absmax):
    """torch: `x` as int8 with fp16 step sizes absmax / 127 (broadcastable to x); a zero absmax gets step 1."""
    import torch

    scale = (absmax.float() / 127).half()
    scale = scale.masked_fill(scale == 0, 1)
    q = torch.clamp(torch.round(x.float() / scale.float()), -127, 127).to(torch.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 values times their (broadcastable) fp16 scale, as the fp16 an unquantised cache returns."""
    return (q.astype(np.float32) * scale.astype(np.float32)).astype(np.float16)
