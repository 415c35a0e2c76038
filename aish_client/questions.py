"""A line or a command's words that are a plain question (`what is a mutex?`), not a pipeline: the
REPL and one-shot aish route them as a quoted question would be."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from aish_client.parser import AUTO, Ask, Pipeline, PipelineSyntaxError, Target, parse

_PIPELINE_START = ('"', "'", "@", "{", "!", "\\")
_PIPELINE_NEXT = {"|", ",", "<<", "-m", "--model", ">", ">>", "{"}


def unquoted_question(line: str, specialists: Sequence[str], commands: Iterable[str] = ()) -> bool:
    """Whether ``line`` is a plain question (`what is a mutex?`) rather than a pipeline: its first word
    is no running specialist (nor close to one: a typo gets the parser's "did you mean"), no command and
    no pipeline construct, and the word after it is no pipeline operator either. While the running
    specialists are unknown (no gateway, no bus), every line is a pipeline, as before."""
    words = line.split()
    if not words or not specialists:
        return False
    first = words[0]
    if first in commands or first.startswith(_PIPELINE_START):
        return False
    name = re.match(r"[a-z0-9-]*", first)
    head = name.group(0) if name else ""
    if head != first and first[len(head)] in ",|{<>":  # `apollo,athena`, `apollo|athena`
        return False
    if head in specialists or difflib.get_close_matches(head, specialists, n=1, cutoff=0.8):
        return False
    return not (len(words) > 1 and words[1] in _PIPELINE_NEXT)


def question_pipeline(line: str) -> Pipeline:
    """`what is a mutex?` as `"what is a mutex?"`; `summarize this | apollo` as `"summarize this" |
    apollo` when what follows the first `|` is a pipeline, else the whole line is the question."""
    text, rest = line, None
    if "|" in line:
        before, after = line.split("|", 1)
        try:
            rest = parse(after) if before.strip() else None
        except PipelineSyntaxError:
            rest = None
        if rest is not None and rest.source is None:
            text = before.strip()
    asked = Ask((Target(AUTO, 1, True),), text, 1)
    if rest is None or text == line:
        return Pipeline(None, (asked,), None, line)
    return Pipeline(None, (asked, *rest.stages), rest.redirect, line)
