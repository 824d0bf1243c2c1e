"""Inference on raw text with a saved student: no teacher, no cache."""
from __future__ import annotations

import torch

from trainer.students import load_student


class Predictor:
    """A loaded student with `predict` (label names) and `predict_proba` (probabilities)."""

    def __init__(self, model: torch.nn.Module, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size
        self.label_names = model.label_names

    @torch.no_grad()
    def predict_proba(self, texts: list[str], texts_b: list[str] | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch_size):
            b = self.model.encode_texts(texts[i : i + self.batch_size],
                                        texts_b[i : i + self.batch_size] if texts_b else None)
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            out.append(self.model(b).logits.float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.label_names or []))

    def predict(self, texts: list[str], texts_b: list[str] | None = None) -> list[str]:
        ids = self.predict_proba(texts, texts_b).argmax(-1).tolist()
        return [self.label_names[i] if self.label_names else i for i in ids]


def load(path: str, device: str = "cpu") -> Predictor:
    """`trainer.load(folder)`: the student saved in `folder`, ready for raw text."""
    return Predictor(load_student(path, device=device))
