"""Config fields that are also command-line flags: a config dataclass declares each setting once,
with its default, type and help, and `pema-client` builds its flags from those fields (as vLLM's
``cli_args.py`` builds its parser from its config classes)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """A dataclass field offered as ``--name`` (or ``flag``) with ``help``."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a config field."""

    name: str  # the config field
    flag: str  # e.g. --val-every
    type: type  # int, float, str or bool
    default: Any  # the field's default (dataclasses.MISSING when it has none)
    help: str
    metavar: str | None
    choices: tuple[str, ...] | None

    @property
    def dest(self) -> str:
        """The parsed arguments' attribute: the flag's name, e.g. ``val_every``."""
        return self.flag.removeprefix("--").replace("-", "_")


def flags(config: type) -> Iterator[Flag]:
    """The flags of ``config``'s fields declared with :func:`option`, in field order."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if "help" not in f.metadata:
            continue
        kind, literal = _scalar(hints[f.name])
        yield Flag(
            name=f.name,
            flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"),
            type=kind,
            default=f.default,
            help=f.metadata["help"],
            metavar=f.metadata["metavar"],
            choices=tuple(f.metadata["choices"] or literal) or None,
        )


def values(config: type, parsed: Any, given: bool = False) -> dict[str, Any]:
    """``config``'s field values in the parsed arguments (only those not None with ``given``)."""
    found = {flag.name: getattr(parsed, flag.dest) for flag in flags(config)}
    return {k: v for k, v in found.items() if v is not None} if given else found


def _scalar(hint: Any) -> tuple[type, tuple[str, ...]]:
    """The flag type of a field annotation (``X | None`` is ``X``), and a Literal's values."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"a flag needs one type (or it | None), got {hint}")
        hint = kinds[0]
    if typing.get_origin(hint) is Literal:
        values = typing.get_args(hint)
        return type(values[0]), tuple(values)
    return hint, ()


def override(config: type, name: str, default: Any) -> Any:
    """``config``'s field ``name`` (its help and flag) with another default, for a subclass."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields:
        raise TypeError(f"{config.__name__} has no field {name!r} to override")
    return dataclasses.field(default=default, metadata=fields[name].metadata)
