"""Training stages: most losses train in one stage; TinyBERT's task distillation in two
(the schedule lives with its loss: trainer.losses.tinybert.TinyBERTSchedule)."""
from __future__ import annotations

from trainer.losses.tinybert import DistillStage as Stage
from trainer.losses.tinybert import TinyBERTSchedule

SCHEDULES = {"tinybert": lambda: TinyBERTSchedule().stages()}


def stages_for(loss: str, epochs: int, lr: float = 0.0) -> list[Stage]:
    """The stages of a named loss. A scheduled loss keeps its stages' epoch ratio scaled to
    `epochs`; `lr` > 0 overrides every stage's."""
    if loss not in SCHEDULES:
        return [Stage(loss=loss, epochs=epochs, lr=lr)]
    plan = SCHEDULES[loss]()
    total = sum(s.epochs for s in plan)
    return [Stage(loss=s.loss, epochs=max(1, round(s.epochs * epochs / total)), lr=lr or s.lr,
                  params=dict(s.params)) for s in plan]
