"""Training stages: most losses train in one stage; TinyBERT's task distillation in two.

TinyBERT (Jiao et al. 2020): stage 1 fits the intermediate layers (embedding + attention
+ hidden) for ~10 epochs at lr 5e-5, stage 2 the predictions for ~3 epochs at lr 3e-5.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stage:
    loss: str = "hinton"
    epochs: int = 1
    lr: float = 0.0  # 0: the student's default
    loss_params: dict = field(default_factory=dict)


# name -> [(loss, epochs, lr)]; epochs None = the run's epochs
SCHEDULES = {
    "tinybert": [("tinybert_intermediate", 10, 5e-5), ("tinybert_pred", 3, 3e-5)],
}


def stages_for(loss: str, epochs: int, lr: float = 0.0, scale_epochs: bool = True) -> list[Stage]:
    """The stages of a named loss. A scheduled loss keeps its epoch ratio scaled to `epochs`
    (the sum of the paper's epochs is used when `scale_epochs` is False)."""
    if loss not in SCHEDULES:
        return [Stage(loss=loss, epochs=epochs, lr=lr)]
    plan = SCHEDULES[loss]
    total = sum(e for _, e, _ in plan)
    return [Stage(loss=name, epochs=max(1, round(e * epochs / total)) if scale_epochs else e, lr=lr or stage_lr)
            for name, e, stage_lr in plan]
