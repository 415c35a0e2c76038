"""Open the first candidate that starts: one rule, from the error policy, for aish and the bridge.

A request for ``@capability`` (or a named specialist) has candidates, best first. Each is tried until
one produces its first chunk (or ends its answer cleanly); an error before that moves on to the next
candidate only when :data:`bus.errors.POLICY` says another specialist may help. Once a token has been
shown nothing is retried: the answer would be stitched from two specialists.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from bus.client import ChatStream
from bus.errors import BusError


@dataclass
class Opened:
    """An open stream, who answers it, and its text from the first chunk on (already waited for).

    ``async with opened.stream`` closes it (entering an open stream again does nothing)."""

    name: str
    stream: ChatStream
    texts: AsyncIterator[str]


def _replay(first: str | None, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    async def texts() -> AsyncIterator[str]:
        if first is None:
            return
        yield first
        async for text in rest:
            yield text

    return texts()


async def open_first(
    names: Sequence[str],
    open_one: Callable[[str], ChatStream],
    *,
    on_try: Callable[[str], None] | None = None,
    on_skip: Callable[[str, BusError, str], None] | None = None,
) -> Opened:
    """The first of ``names`` whose stream (made by ``open_one``) starts answering.

    ``on_try(name)`` is called before each attempt, ``on_skip(name, error, next_name)`` when one
    failed and the next is tried. The last error is raised when none starts."""
    if not names:
        raise BusError("no candidate specialist to ask")
    for n, name in enumerate(names):
        if on_try is not None:
            on_try(name)
        stream = open_one(name)
        try:
            await stream.__aenter__()
            rest = aiter(stream)
            try:
                first: str | None = await anext(rest)
            except StopAsyncIteration:
                first = None
        except BusError as err:
            await stream.__aexit__(None, None, None)
            if n + 1 == len(names) or not err.may_help_elsewhere:
                raise
            if on_skip is not None:
                on_skip(name, err, names[n + 1])
            continue
        except BaseException:
            await stream.__aexit__(None, None, None)
            raise
        return Opened(name, stream, _replay(first, rest))
    raise AssertionError("unreachable")
