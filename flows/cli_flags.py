"""Command-line flags made from the parameter models, so a parameter is declared once: its
name, type, choices, default and help come from the pydantic field (the same text the
Prefect UI form shows).

    add_flags(parser, TrainConfig)                  # --epochs, --learning-rate, --method {lora,full}, ...
    config = from_flags(args, TrainConfig, "train")  # the model; a bad value is one line (UserError)

A flag given for two models (``--device`` for the generator and the scorer of
``mods necessity``) sets the field in both.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError


class UserError(Exception):
    """A problem with what the user gave: printed as one line, exit status 2."""


def _dest(model: type[BaseModel], field: str) -> str:
    return f"{model.__name__}.{field}"


def _argument(annotation: Any) -> dict[str, Any] | None:
    """argparse keywords for a field's type; None for fields a flag cannot hold (sections)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _argument(options[0]) if len(options) == 1 else None
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return {"choices": choices, "type": type(choices[0])}
    if origin is list and typing.get_args(annotation) in ((str,), (int,), (float,)):
        return {"nargs": "+", "action": "extend", "type": typing.get_args(annotation)[0]}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation}
    return None


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], rename: dict[str, str] | None = None,
              skip: frozenset[str] | set[str] = frozenset()) -> None:
    """A flag per field of ``model`` (``--field-name``, or ``--<rename[field]>``)."""
    rename = rename or {}
    owners = {option: action.dest for action in parser._actions for option in action.option_strings}
    for name, field in model.model_fields.items():
        keywords = _argument(field.annotation)
        if name in skip or keywords is None:
            continue
        flag = "--" + rename.get(name, name).replace("_", "-")
        if flag in owners:  # another model's field of the same name: the flag sets both
            parser.set_defaults(**{"_alias." + _dest(model, name): owners[flag]})
            continue
        default = field.get_default(call_default_factory=True)
        shown = "empty" if default is None else " ".join(map(str, default)) if isinstance(default, list) else default
        text = (field.description or "").replace("%", "%%")
        if "choices" not in keywords:  # the flag's own name, not the model's field path
            keywords = {**keywords, "metavar": flag[2:].upper().replace("-", "_")}
        parser.add_argument(flag, dest=_dest(model, name), default=None,
                            help=f"{text} (default: {shown})" if text else f"default: {shown}", **keywords)
        owners[flag] = _dest(model, name)


def flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` given on the command line."""
    given = {}
    for name in model.model_fields:
        dest = _dest(model, name)
        value = getattr(args, getattr(args, "_alias." + dest, dest), None)
        if value is not None:
            given[name] = value
    return given


def from_flags(args: argparse.Namespace, model: type[BaseModel], what: str, **values: Any) -> Any:
    """``model`` from the flags given (its defaults elsewhere); ``values`` go in as well."""
    try:
        return model(**{**flag_values(args, model), **{k: v for k, v in values.items() if v is not None}})
    except ValidationError as error:
        problem = error.errors()[0]
        raise UserError(f"{what}: {'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None
