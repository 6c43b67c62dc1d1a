"""Command-line flags generated from a settings model's fields (`flows.settings`), and the parsed flags back as
the model's values.

One flag per field: its name is the field's (``num_workers`` -> ``--num-workers``) unless the field declares
the flag users know (``json_schema_extra={"cli": "--workers"}``; ``"flow_cli"`` where the flow sub-commands,
whose groups share one set of flags, spell it apart: ``--train-batch-size``); its type, ``nargs`` and
choices come from the annotation (a Literal gives the choices, a tuple or list takes several values, a bool is
``--flag`` / ``--no-flag``); its help is the field's docstring with its default. The flag's destination is
``GROUP.FIELD`` and it has no default of its own unless the command gives one (``defaults``): only what the
user typed reaches the model, whose defaults and validators then apply, once.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

CLI = "cli"  # json_schema_extra key: the flag users know, where it is not the field's name
FLOW_CLI = "flow_cli"  # ... in the flow sub-commands (add-class, retrain), where it differs again
METAVAR = "metavar"  # json_schema_extra key: the flag's metavar


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, Mapping) else {}


def flag_name(name: str, info: FieldInfo, *, flow: bool = False, prefix: str = "") -> str:
    """The flag of field `name`: its ``flow_cli`` (with `flow`) or ``cli`` name, else ``--PREFIXNAME`` with
    dashes for underscores."""
    extra = _extra(info)
    if flow and FLOW_CLI in extra:
        return str(extra[FLOW_CLI])
    if CLI in extra:
        return str(extra[CLI])
    return "--" + prefix + name.replace("_", "-")


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _argument_kwargs(info: FieldInfo) -> dict[str, Any]:
    """type / nargs / choices / action of a field's flag, from its annotation."""
    annotation = _unwrap(info.annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return {"choices": args, "type": type(args[0])}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is tuple:
        nargs: int | str = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
        return {"type": args[0], "nargs": nargs}
    if origin is list:
        return {"type": args[0], "nargs": "+"}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"No command-line flag for a field of type {info.annotation!r}.")


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def add_model_flags(container: argparse._ActionsContainer, model: type[BaseModel], *, group: str,
                    flow: bool = False, prefix: str = "", only: Iterable[str] | None = None,
                    exclude: Collection[str] = (), defaults: Mapping[str, Any] | None = None,
                    default_help: Mapping[str, str] | None = None) -> None:
    """One flag per field of `model` (those in `only`, in its order, else all but `exclude`), with
    destination ``GROUP.FIELD``.

    Args:
        flow: Use the fields' ``flow_cli`` names (the flow sub-commands).
        prefix: Put before the flags named after their fields (``review-`` -> ``--review-top``).
        defaults: This command's own defaults for some fields (the flag then has that default); the others
            have none, so an unset field takes the model's.
        default_help: How the help says the default of fields whose default the command computes later
            (``"N on a GPU, M on the CPU"``).
    """
    defaults, default_help = defaults or {}, default_help or {}
    names = list(only) if only is not None else [n for n in model.model_fields if n not in exclude]
    unknown = (set(names) | set(defaults) | set(default_help)) - set(model.model_fields)
    if unknown:
        raise ValueError(f"{model.__name__} has no fields {sorted(unknown)}.")
    for name in names:
        info = model.model_fields[name]
        kwargs = _argument_kwargs(info)
        if name in defaults:
            default = defaults[name]
            kwargs["default"] = list(default) if isinstance(default, tuple) else default
            shown: str | None = _shown(default)
        else:
            kwargs["default"] = argparse.SUPPRESS
            default = info.get_default(call_default_factory=True)
            shown = default_help.get(name) or (None if default is None else _shown(default))
        description = " ".join((info.description or "").split())
        kwargs["help"] = (description + (f" (default: {shown})" if shown is not None else "")).replace("%", "%%")
        metavar = _extra(info).get(METAVAR, None if "choices" in kwargs else name.upper())
        if metavar is not None and kwargs.get("action") is None:
            kwargs["metavar"] = tuple(metavar) if isinstance(metavar, list | tuple) else metavar
        container.add_argument(flag_name(name, info, flow=flow, prefix=prefix), dest=f"{group}.{name}", **kwargs)


def model_values(args: argparse.Namespace, group: str) -> dict[str, Any]:
    """The values of group `group`'s flags that were set (by the user, or by a command's own default)."""
    head = group + "."
    return {dest[len(head):]: value for dest, value in vars(args).items() if dest.startswith(head)}
