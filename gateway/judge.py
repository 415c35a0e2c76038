"""A zero-shot routing judgment by a model the user configured (``routing_model``): the model is shown
the running specialists' names and descriptions and the request, and answers with one name.

The gateway runs no model itself: it asks a running specialist (the generalist when it runs) to answer
with the routing model (``ChatRequest.model``), so every provider and its configuration work as they do
for any request. Anything but a running specialist's name within the timeout (an error, silence,
chatter) is no judgment: the embedding router's choice stands.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import structlog

from bus.client import Bus
from bus.discovery import SpecialistView
from bus.errors import BusError
from bus.wire import ChatMessage, ChatOptions

log = structlog.get_logger("tekton.gateway.judge")

# Enough of a long paste to tell what it is about; the prompt stays small for a small model.
_MAX_REQUEST_CHARS = 1500
INSTRUCTIONS = (
    "You route requests to specialists. Read the list of specialists and the request, then answer "
    "with the name of the one specialist best suited to answer it: one lowercase name from the list, "
    "nothing else."
)


def prompt(text: str, views: Sequence[SpecialistView]) -> list[ChatMessage]:
    """The routing question: short, with every name and description, and the answer it wants."""
    listed = "\n".join(f"- {v.name}: {v.description}" for v in views)
    names = ", ".join(v.name for v in views)
    request = text[:_MAX_REQUEST_CHARS]
    question = (
        f"Specialists:\n{listed}\n\nRequest:\n<<<\n{request}\n>>>\n\n"
        f"Which specialist should answer this request? Answer with exactly one of: {names}."
    )
    return [ChatMessage(role="system", content=INSTRUCTIONS), ChatMessage(role="user", content=question)]


def pick(answer: str, names: Sequence[str]) -> str | None:
    """The specialist ``answer`` names: the first running name it mentions as a word, else None."""
    found = [(m.start(), n) for n in names if (m := re.search(rf"\b{re.escape(n)}\b", answer.lower()))]
    return min(found)[1] if found else None


@dataclass(frozen=True)
class Verdict:
    chosen: str | None  # None: no usable judgment
    note: str  # what happened, for the route's reason


class ModelJudge:
    """Asks ``model`` (through a running specialist) which specialist should answer a request."""

    def __init__(self, bus: Bus, model: str, timeout_s: float, generalist: str):
        self.bus = bus
        self.model = model
        self.timeout_s = timeout_s
        self.generalist = generalist

    async def judge(self, text: str, views: Sequence[SpecialistView]) -> Verdict:
        names = [v.name for v in views]
        if not names:
            return Verdict(None, "no specialist runs to ask")
        via = self.generalist if self.generalist in names else names[0]
        # Greedy, and a few tokens: a name is all it may say.
        options = ChatOptions(max_tokens=8, temperature=0.0)
        answer: list[str] = []
        try:
            with anyio.fail_after(self.timeout_s):
                async with self.bus.stream(
                    via, prompt(text, views), options, timeout=self.timeout_s, model=self.model
                ) as s:
                    async for token in s:
                        answer.append(token)
                        if pick("".join(answer), names) is not None:
                            break  # leaving the block cancels the rest on the specialist
        except TimeoutError:
            log.info("routing model timed out", model=self.model, timeout_s=self.timeout_s)
            return Verdict(None, f"{self.model} gave no answer within {self.timeout_s:g} s")
        except BusError as err:
            log.info("routing model failed", model=self.model, error=str(err))
            return Verdict(None, f"{self.model} failed: {err}")
        said = "".join(answer).strip()
        chosen = pick(said, names)
        if chosen is None:
            return Verdict(None, f"{self.model} named no running specialist ({said[:40]!r})")
        return Verdict(chosen, f"chosen by {self.model}")
