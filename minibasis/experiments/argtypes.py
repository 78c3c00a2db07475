"""Range checks as ``argparse`` types: a verb's option is refused while parsing, with the rules and
wording of :mod:`minibasis.checks` (``--epochs must be a positive integer, got 0``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from minibasis.checks import energy_threshold, int_at_least

__all__ = ["positive", "non_negative", "fraction", "positive_float", "thresholds", "Thresholds", "device", "output_file"]

#: The devices a user chooses from ("strict", a CPU stand-in that refuses host/device mix-ups as CuPy
#: does, is accepted too: it checks the command path for device bugs on a machine without a GPU).
DEVICES = ("numpy", "cupy")


def _number(text: str, kind=int):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")


def _checked(rule, *rule_args):
    try:
        return rule(*rule_args)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("value ")) from None


def positive(text: str) -> int:
    return _checked(int_at_least, "value", _number(text), 1)


def non_negative(text: str) -> int:
    return _checked(int_at_least, "value", _number(text), 0)


def fraction(text: str) -> float:
    """A number in (0, 1] (energy thresholds, mult ratios)."""
    return _checked(energy_threshold, _number(text, float), "value")


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:   # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


class Thresholds(list):
    """Energy thresholds that ``config.json`` records as the text ``"1,0.95,0.9"``."""

    def __str__(self) -> str:
        return ",".join(f"{t:g}" for t in self)


def thresholds(text: str) -> Thresholds:
    """``"1.0,0.95,0.9"`` → ``[1.0, 0.95, 0.9]``, each in (0, 1]; a bad item is named."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                values.append(energy_threshold(float(part)))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not a number in (0, 1] (in {text!r})") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    return Thresholds(values)


def device(text: str) -> str:
    """An array backend name (:func:`minibasis.backend.available_backends`)."""
    from minibasis import backend

    if text not in backend.available_backends():
        raise argparse.ArgumentTypeError(f"must be {' or '.join(DEVICES)}, got {text!r}")
    return text


def output_file(text: str) -> str:
    """A file to write (``-``: standard output), refused while parsing when it is a folder or its
    folder is missing, so a long check never ends in an unwritable report."""
    path = Path(text)
    if text != "-" and path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name (e.g. {path / 'report.json'})")
    if text != "-" and not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its folder {path.parent} does not exist")
    return text
