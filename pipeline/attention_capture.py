"""Capture pre-softmax attention scores and value vectors of chosen layers.

transformers 5.x runs SDPA by default, which returns no attention maps; TinyBERT needs
the *pre-softmax* scores QKᵀ·scaling. For models whose attention calls the
AttentionInterface (BERT and most encoders) we register an implementation that records
the scores of the chosen layers and returns the SDPA output, and register SDPA's mask
builder under the same name (without it the model silently gets attention_mask=None).
MPNet adds a relative position bias inside its own eager attention, so there we hook its
self-attention module and rebuild the same scores from its inputs.

Used by the teacher (inference) and by small-BERT students (with gradients). Layer
numbers are 1-based: layer l is the l-th encoder layer (hidden_states[l] is its output).
No model weights are loaded here.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPL_NAME = "distil_capture"


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    capture = getattr(module, "_distil_capture", None)
    if capture is not None:
        layer = module.layer_idx + 1
        if layer in capture.layers:
            scale = scaling if scaling is not None else query.size(-1) ** -0.5
            capture.scores[layer] = torch.matmul(query, key.transpose(-1, -2)) * scale
        if layer == capture.values_layer:
            capture.values = value.transpose(1, 2).flatten(2)  # (B, L, H*d_head)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(IMPL_NAME, _capture_attention)
AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, model.base_model_prefix, model) if hasattr(model, "base_model_prefix") else model
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no encoder.layer list to capture attention from")
    return list(layers)


def _self_attention(layer: nn.Module) -> nn.Module:
    att = layer.attention
    return getattr(att, "self", None) or getattr(att, "attn")


class AttentionCapture:
    """Context manager: `with AttentionCapture(model, layers=[2, 4]) as cap: model(...)`.

    After the forward, `cap.scores[l]` is (B, heads, L, L) pre-softmax scores without the
    mask added, and `cap.values` is (B, L, hidden) of `values_layer`, when asked.
    """

    def __init__(self, model: nn.Module, layers=(), values_layer: int | None = None):
        self.model = model
        self.layers = set(layers)
        self.values_layer = values_layer
        self.scores: dict[int, torch.Tensor] = {}
        self.values: torch.Tensor | None = None
        self._hooks = []
        self._modules = [_self_attention(layer) for layer in _encoder_layers(model)]
        self._uses_interface = all(hasattr(m, "layer_idx") and hasattr(m, "config") for m in self._modules)
        if self._uses_interface and model.config._attn_implementation != IMPL_NAME:
            # Same outputs as SDPA when nothing is attached, so it can stay switched on.
            model.set_attn_implementation(IMPL_NAME)

    def __enter__(self) -> "AttentionCapture":
        self.scores, self.values = {}, None
        if not self.layers and self.values_layer is None:
            return self
        if self._uses_interface:
            for m in self._modules:
                m._distil_capture = self
        else:
            for i, m in enumerate(self._modules):
                if i + 1 in self.layers or i + 1 == self.values_layer:
                    self._hooks.append(m.register_forward_pre_hook(self._hook(i + 1), with_kwargs=True))
        return self

    def _hook(self, layer: int):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            shape = (*hidden.shape[:-1], -1, module.attention_head_size)
            if layer in self.layers:
                q = module.q(hidden).view(shape).transpose(1, 2)
                k = module.k(hidden).view(shape).transpose(1, 2)
                scores = torch.matmul(q, k.transpose(-1, -2)) / module.attention_head_size**0.5
                bias = kwargs.get("position_bias", args[2] if len(args) > 2 else None)
                self.scores[layer] = scores + bias if bias is not None else scores
            if layer == self.values_layer:
                self.values = module.v(hidden)

        return pre_hook

    def __exit__(self, *exc) -> None:
        for m in self._modules:
            m._distil_capture = None
        for h in self._hooks:
            h.remove()
        self._hooks = []
