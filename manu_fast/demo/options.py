"""Command-line options generated from the demo's dataclasses: a field with ``option(...)`` metadata is one
``--field-name`` option whose default, type, choices and help come from the field (one place per fact)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def option(default: Any, help: str, *, flag: str | None = None, choices=None, nargs: str | None = None,
           type: type | None = None) -> Any:
    """A dataclass field that is also a command-line option. ``flag`` overrides ``--field-name``; the value type is
    the default's (``type`` where the default is None); tuples take ``nargs`` (default "+") values of their
    default's element type; bools are ``store_true`` switches. The help gets the default unless it names one."""
    meta = {"help": help, "flag": flag, "choices": choices, "nargs": nargs, "type": type}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata={"option": meta})


def _options(cls):
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def _flag(f, meta) -> str:
    return meta["flag"] or "--" + f.name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One option per ``option`` field of dataclass ``cls``, in an argument group named ``title``."""
    group = parser.add_argument_group(title)
    for f, meta in _options(cls):
        default = f.default
        flag = _flag(f, meta)
        kwargs = {"dest": f.name, "help": meta["help"]}
        if isinstance(default, bool):
            if default:
                raise TypeError(f"{cls.__name__}.{f.name}: switches must default to False")
            group.add_argument(flag, action="store_true", **kwargs)
            continue
        if isinstance(default, tuple):
            kwargs.update(nargs=meta["nargs"] or "+", default=list(default))
            element = type(default[0]) if default else str
        else:
            kwargs["default"] = default
            element = meta["type"] or type(default)
        kwargs["type"] = element
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        if "default:" not in kwargs["help"]:
            kwargs["help"] += " (default: %(default)s)"
        group.add_argument(flag, **kwargs)


def from_args(cls, args: argparse.Namespace, **fixed):
    """An instance of ``cls`` from parsed options (tuples back from lists), plus ``fixed`` fields."""
    values = {}
    for f, _ in _options(cls):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return cls(**values, **fixed)
