"""Stage two: students trained from a teacher cache. `trainer.load(path)` loads one for inference."""


def load(path: str, device: str = "cpu"):
    from trainer.api import load as _load

    return _load(path, device)
