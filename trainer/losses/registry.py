"""One registry for every distillation loss (torchdistill-style), entries are pure functions.

An entry is a `LossSpec`: the function, its hyper-parameters as a dataclass, the teacher
cache fields it reads and what the student must return. The trainer asks the spec which
cache fields to open (a logits-only loss never opens the Zarr arrays) and which `want`
items to pass to the student's forward.

    @register("hinton", params=HintonParams, fields=("logits",), needs_labels=True)
    def hinton(out, batch, p, state) -> (loss, parts): ...

    spec = get_loss("hinton"); p = make_params("hinton", {"t": 4})
    loss, parts = spec.fn(student_output, batch, p, state)

Params come from plain mappings (YAML safe_load / key=value overrides) through
data.config.from_dict: unknown keys and ill-typed values are errors; nothing executes code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from data.config import ConfigError, from_dict

# Teacher-cache field groups (same names as pipeline.cache_schema.ALL_FIELDS; a test keeps
# them equal) and what a student forward can be asked for.
CACHE_FIELDS = frozenset({"logits", "cls", "input_ids", "hidden", "attention", "values"})
STUDENT_NEEDS = frozenset({"hidden", "attention", "values"})

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> item, with one-line errors naming the known entries."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """An unknown name is a ConfigError (a ValueError): the CLI prints it as one line, exit 2."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable  # fn(out: StudentOutput, batch: dict, p: params_cls, state: dict) -> (Tensor, dict[str, float])
    params_cls: type
    fields: tuple[str, ...]  # teacher cache fields read (batch keys "teacher_<field>")
    student_needs: frozenset  # `want` for the student forward
    needs_labels: bool  # reads batch["labels"] (-100 = no gold label)
    needs_second_teacher: bool  # reads batch["teacher2_logits"] (a second cache joined by row id)
    token_level: bool = False  # compares token positions: the student must read the teacher's tokens

    def __call__(self, out, batch: dict, params: Any = None, state: dict | None = None):
        """Convenience: default params when none are given."""
        return self.fn(out, batch, self.params_cls() if params is None else params, {} if state is None else state)


LOSSES: Registry[LossSpec] = Registry("loss")


def register(name: str, *, params: type, fields: tuple[str, ...] | list[str], student_needs=(),
             needs_labels: bool = False, second_teacher: bool = False, token_level: bool = False):
    """Decorator adding `fn` to the loss registry under `name`."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"loss {name!r}: params must be a dataclass type")
    bad = set(fields) - CACHE_FIELDS
    if bad:
        raise ValueError(f"loss {name!r}: unknown cache fields {sorted(bad)}; allowed: {sorted(CACHE_FIELDS)}")
    bad = set(student_needs) - STUDENT_NEEDS
    if bad:
        raise ValueError(f"loss {name!r}: unknown student needs {sorted(bad)}; allowed: {sorted(STUDENT_NEEDS)}")

    def wrap(fn: Callable) -> Callable:
        LOSSES.add(name, LossSpec(name=name, fn=fn, params_cls=params, fields=tuple(fields),
                                  student_needs=frozenset(student_needs), needs_labels=needs_labels,
                                  needs_second_teacher=second_teacher, token_level=token_level))
        return fn

    return wrap


def get_loss(name: str) -> LossSpec:
    return LOSSES.get(name)


def loss_names() -> list[str]:
    return LOSSES.names()


def make_params(name: str, values: dict | None = None):
    """The params dataclass of loss `name` filled from a plain mapping (unknown keys -> ValueError)."""
    spec = get_loss(name)
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"loss {name!r}: params must be a mapping, got {type(values).__name__}")
    return from_dict(spec.params_cls, dict(values or {}), where=f"loss {name!r} params")
