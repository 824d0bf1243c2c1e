"""Typed dataclass configs filled from a YAML file and `key=value` overrides.

One mechanism for every entry point (litgpt style): a YAML file and the command line
fill the same dataclass; unknown keys are errors, values are YAML-parsed (safe_load,
never code), and the resolved config is written beside each output folder.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import os
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclass."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert YAML-parsed `value` to the annotated type `tp` (dataclasses recursively)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is none of {args}")
    if _is_dataclass_type(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:  # a field without a default: one line naming it, not a TypeError from the constructor
        raise ConfigError(f"{where}: missing key(s) {missing}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then `key.sub=value` overrides."""
    tree = to_dict(cls())
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        _merge(tree, loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return from_dict(cls, tree, where=str(path or cls.__name__))


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def save_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.json") -> Path:
    """Write the resolved config beside an output folder (atomically)."""
    from data.io import atomic_write_text

    path = Path(out_dir) / name
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True))
    return path


def parse_cli(cls: type[T], argv: list[str] | None = None) -> T:
    """`--config FILE` (optional) followed by `key=value` overrides; `-h`/`--help` prints the fields, exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, sys._getframe(1).f_globals))  # the calling entry point's module: no help code in it
        sys.exit(0)
    path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file")
        path = argv[i + 1] or None
        del argv[i : i + 2]
    return load_config(cls, path, argv)


def help_text(cls: type, module: dict) -> str:
    """`--help` of the entry point whose module globals are `module`: its command and docstring, then every
    field of `cls` (nested dataclasses as sections) with type, default and source comment, read from the
    dataclass itself so the help cannot drift from it."""
    spec = module.get("__spec__")
    command = f"python -m {spec.name}" if spec else f"python {sys.argv[0]}"
    out = [f"usage: {command} [--config FILE.yaml] [key=value ...]", ""]
    doc = inspect.cleandoc(module.get("__doc__") or "")
    out += [doc, ""] if doc else []
    out += ["The YAML file, then the key=value overrides (YAML values), fill the fields below: nested keys",
            "with dots (section.key=value), lists with commas (key=a,b); `x[].*`: the fields of each item of list x."]
    sections = [("", cls)]
    for prefix, section in sections:  # grows as nested dataclasses are found
        out += ["", f"{prefix}* ({section.__name__}):" if prefix else f"{section.__name__}:"]
        hints, comments = typing.get_type_hints(section), _field_comments(section)
        for f in dataclasses.fields(section):
            nested, many = _nested(hints[f.name])
            if nested:
                sections.append((f"{prefix}{f.name}{'[]' if many else ''}.", nested))
            line = f"  {f.name}: {f.type if isinstance(f.type, str) else getattr(f.type, '__name__', f.type)}"
            if nested and not many:
                line += f"  (section {prefix}{f.name}.*)"
            elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                line += f" = {json.dumps(value, ensure_ascii=False, default=str)}"
            else:
                line += "  (required)"
            out.append(f"{line}  # {comments[f.name]}" if f.name in comments else line)
    return "\n".join(out)


def _nested(tp: Any) -> tuple[type | None, bool]:
    """The dataclass a field holds (a help section), and whether it holds a list of them."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, tuple) and args and _is_dataclass_type(args[0]):
        return args[0], True
    return (tp, False) if _is_dataclass_type(tp) else (None, False)


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the class source, with the comment-only lines that continue it:
    the comments are the fields' documentation today."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source file (a class built at run time): no comments
        return {}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    comments: dict[str, list[str]] = {}
    depth, name, at_start, last_line = 0, None, True, -1
    for i, tok in enumerate(tokens):
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            depth += 1 if tok.type == tokenize.INDENT else -1
        elif tok.type == tokenize.NEWLINE:
            at_start = True
        elif tok.type == tokenize.COMMENT:
            if name and (not at_start or (name in comments and tok.start[0] == last_line + 1)):
                comments.setdefault(name, []).append(tok.string.lstrip("#").strip())
                last_line = tok.start[0]
        elif tok.type != tokenize.NL and at_start:  # the first token of a statement
            at_start = False
            is_field = depth == 1 and tok.type == tokenize.NAME and tokens[i + 1].string == ":"
            name = tok.string if is_field else None
    return {k: " ".join(v) for k, v in comments.items()}
