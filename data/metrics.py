"""Classification metrics shared by the teacher and the students."""
from __future__ import annotations

import numpy as np


def classification_metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    """Accuracy and macro-F1 (classes absent from both preds and labels count as F1 0)."""
    f1s = []
    for k in range(num_labels):
        tp = np.sum((preds == k) & (labels == k))
        denom = np.sum(preds == k) + np.sum(labels == k)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(preds == labels)) if len(labels) else float("nan"),
            "macro_f1": float(np.mean(f1s))}
