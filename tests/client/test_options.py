"""Config fields declared once with their flag: names, types, choices, defaults and overrides."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from data_owner_client.options import flags, option, override, values


@dataclass
class Example:
    size: int = option(8, help="a size")
    every: int | None = option(None, help="every N steps", flag="--every-n", metavar="N")
    mode: Literal["a", "b"] = option("a", help="a mode")
    verbose: bool = option(False, help="say more")
    internal: int = 3  # no flag


def test_flags_come_from_the_fields_declared_with_option():
    found = {f.name: f for f in flags(Example)}
    assert list(found) == ["size", "every", "mode", "verbose"]
    assert (found["size"].flag, found["size"].type, found["size"].default) == ("--size", int, 8)
    assert (found["every"].flag, found["every"].dest, found["every"].type) == (
        "--every-n",
        "every_n",
        int,
    )
    assert found["mode"].choices == ("a", "b") and found["verbose"].type is bool


def test_values_read_the_parsed_flags_back_into_fields():
    parsed = argparse.Namespace(size=4, every_n=None, mode="b", verbose=True)
    assert values(Example, parsed) == dict(size=4, every=None, mode="b", verbose=True)
    assert values(Example, parsed, given=True) == dict(size=4, mode="b", verbose=True)


def test_override_keeps_the_help_and_changes_the_default():
    @dataclass
    class Other(Example):
        size: int = override(Example, "size", 16)

    (size,) = (f for f in flags(Other) if f.name == "size")
    assert (size.default, size.help) == (16, "a size")
    with pytest.raises(TypeError, match="no field 'sise'"):
        override(Example, "sise", 1)


def test_a_flag_of_two_types_is_refused():
    @dataclass
    class Ambiguous:
        value: int | str = option(1, help="either")

    with pytest.raises(TypeError, match="one type"):
        list(flags(Ambiguous))
