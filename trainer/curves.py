"""Training curves as TensorBoard event files in `<run folder>/tensorboard/`: every loss term, the lr and
the dev metrics, against the global step. `tensorboard --logdir work/students` shows every run of an
out_dir side by side. Only rank 0 writes; `tensorboard=false` writes nothing.
"""
from __future__ import annotations

from pathlib import Path


def open_curves(out: Path, cfg, state: dict | None, epochs: int):
    """A writer for one stage, or None: curves off, or the stage finished before (a rerun adds nothing).
    A resumed stage purges what the interrupted process logged after its checkpoint, so no step is drawn twice."""
    if not cfg.tensorboard or (state and state["epoch"] >= epochs):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=state["global_step"] + 1 if state else None)


def log_step(writer, step: int, parts: dict, lr: float) -> None:
    """The loss and each of its terms (the `parts` the loss returns), and the learning rate."""
    if writer is None:
        return
    for name, value in parts.items():
        writer.add_scalar(f"train/{name}", float(value), step)
    writer.add_scalar("train/lr", lr, step)


def log_epoch(writer, step: int, record: dict) -> None:
    """An epoch's mean training loss and dev metrics, at the step it ended."""
    if writer is None:
        return
    writer.add_scalar("epoch/train_loss", record["train_loss"], step)
    for name, value in record.items():
        if name.startswith("dev_"):
            writer.add_scalar(f"dev/{name[4:]}", value, step)
