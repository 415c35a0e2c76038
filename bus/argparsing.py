"""Command-line parsing shared by `aish` and `tekton`: a usage error is one line and exit 2."""

from __future__ import annotations

import argparse
import math
import typing
from typing import Any

EXIT_USAGE = 2  # a usage error, for both commands (aish_client.exits uses it too)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), not the whole usage text."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def number(kind: type[float] | type[int], low: float, high: float, low_open: bool = False) -> Any:
    """An argparse type: a finite number in [low, high] (or (low, high] with ``low_open``)."""

    def show(x: float) -> str:
        return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"

    above = f"above {show(low)}" if low_open else f"at least {show(low)}"

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"{text!r} must be {above} and at most {show(high)}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# A TCP port to listen on (0: the system picks a free one).
port = number(int, 0, 65535)
# A wait or an interval, in seconds (up to a day).
seconds = number(float, 0, 86_400, low_open=True)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def log_level(text: str) -> str:
    """A logging level's name, any case."""
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def at_least(low: int) -> Any:
    """A count of ``low`` or more (nodes, replicas, lines)."""
    return number(int, low, 1_000_000)
