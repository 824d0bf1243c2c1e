"""Distillation losses: one registry (`get_loss`, `make_params`), one small module per family.

Importing this package registers every loss; see docs/losses.md for formulas and conventions.
"""
from trainer.losses import ckd, distilbert, dynamic, logit, minilm, pkd, tinybert  # noqa: F401  (register)
from trainer.losses.registry import LOSSES, LossSpec, Registry, get_loss, loss_names, make_params, register
from trainer.losses.tinybert import DistillStage, TinyBERTSchedule
from trainer.losses.types import StudentOutput

__all__ = ["LOSSES", "LossSpec", "Registry", "StudentOutput", "DistillStage", "TinyBERTSchedule", "get_loss",
           "loss_names", "make_params", "register"]
