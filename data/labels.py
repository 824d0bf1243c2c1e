"""Class names from a label column: stripped, case-folded by default, refused when ambiguous.

`Negative`, `NEGATIVE` and `negative ` are one class, not three; a column mixing integer
codes with names is refused unless data.label_names says which code is which name.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from data.io import UserError

_CODE = re.compile(r"-?\d+")


def is_missing_label(value) -> bool:
    """None, NaN or an empty cell: an unlabelled row."""
    return value is None or value != value or (isinstance(value, str) and not value.strip())


@dataclass
class Labels:
    """Raw label cells -> class index; `merged` lists the spellings that became one class."""

    names: list[str]
    lookup: dict[str, int]
    fold_case: bool = True
    merged: dict[str, list[str]] = field(default_factory=dict)

    def key(self, value) -> str:
        text = str(value).strip()
        return text.lower() if self.fold_case else text

    def index(self, value) -> int | None:
        """The class of a non-missing cell; None when it is no class name or code."""
        return self.lookup.get(self.key(value))

    def merged_line(self) -> str:
        """One line naming what folding and stripping merged ('' when nothing was)."""
        parts = [",".join(repr(s) for s in spellings) + f" -> {name!r}" for name, spellings in self.merged.items()]
        return f"labels: merged {'; '.join(parts)} (data.fold_label_case=false keeps case)" if parts else ""


def resolve_labels(values: list, given: list[str], fold_case: bool, where: str) -> Labels:
    """Class names for the raw label cells `values`: `given` (data.label_names) or the distinct labels.

    With names given, a cell is a name or an integer code 0..K-1; without, a column mixing
    codes and names is refused (which code is which name is a guess we will not make).
    """
    probe = Labels([], {}, fold_case)
    spellings: dict[str, set[str]] = defaultdict(set)
    for v in values:
        if not is_missing_label(v):
            spellings[probe.key(v)].add(str(v))
    if given:
        lookup: dict[str, int] = {}
        for i, name in enumerate(given):
            if probe.key(name) in lookup:
                raise UserError(f"data.label_names: {given[lookup[probe.key(name)]]!r} and {name!r} are the same "
                                "label once stripped and case-folded (data.fold_label_case=false keeps case)")
            lookup[probe.key(name)] = i
        names = list(given)
        for key in spellings:
            if _CODE.fullmatch(key) and key not in lookup and 0 <= int(key) < len(names):
                lookup[key] = int(key)
    else:
        codes = sorted((k for k in spellings if _CODE.fullmatch(k)), key=int)
        named = sorted(k for k in spellings if not _CODE.fullmatch(k))
        if codes and named:
            raise UserError(f"{where}: the label column mixes integer codes {codes[:5]} and names {named[:5]}; "
                            "set data.label_names (code i is the i-th name) or make the column consistent")
        keys = codes or named
        lookup = {key: i for i, key in enumerate(keys)}
        # a label spelt one way keeps its spelling; several spellings become the folded one
        names = [next(iter(s)) if len(s := {f.strip() for f in spellings[k]}) == 1 else k for k in keys]
    merged = {names[lookup[key]]: sorted(forms) for key, forms in spellings.items()
              if len(forms) > 1 and key in lookup and not _CODE.fullmatch(key)}
    return Labels(names, lookup, fold_case, merged)
