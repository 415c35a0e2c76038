"""Who should answer: by capability (declared score x live health) or from the text of a request.

Two ways to match text to specialists, both measured on ``tests/data/routing.jsonl`` (see
``bench/discovery.py``):
- ``lexical``: BM25 over each specialist's profile (description, capabilities, keywords).
- ``embedding``: cosine similarity of WordLlama embeddings (``wordllama``: 256-dim static token
  embeddings, MIT, weights shipped inside the wheel and loaded from it with downloads disabled).
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol

from bus.discovery import SpecialistView
from bus.errors import BadRequest

Method = Literal["lexical", "embedding", "hybrid"]
DEFAULT_METHOD: Method = "lexical"
DEFAULT_THRESHOLD = 0.7

_WORD_RE = re.compile(r"[a-z0-9+#]+")
_STOP_WORDS = """a an and are as at be by can do does for from how i in into is it its me my of on or our
should so that the this to we what when where which who why will with you your"""
_STOP = frozenset(_STOP_WORDS.split())


def stem(word: str) -> str:
    """A crude suffix stripper: enough for 'bugs'/'bug', 'planning'/'plan', 'costs'/'cost'."""
    for suffix in ("ing", "ies", "es", "ed", "s", "ly"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            word = word[: -len(suffix)] + ("y" if suffix == "ies" else "")
            break
    if len(word) > 3 and word[-1] == word[-2]:  # planning -> plann -> plan
        word = word[:-1]
    return word


def terms(text: str) -> list[str]:
    return [stem(w) for w in _WORD_RE.findall(text.lower().replace("-", " ")) if w not in _STOP]


def profile(view: SpecialistView) -> str:
    """The text that describes what a specialist is for."""
    caps = ", ".join(view.capabilities)
    return f"{view.description}. {caps}. {', '.join(view.keywords)}"


class TextMatcher(Protocol):
    def scores(self, text: str) -> dict[str, float]: ...


class Lexical:
    """BM25 of the request's terms against each profile, scaled so the best is at most 1."""

    def __init__(self, views: Sequence[SpecialistView], k1: float = 1.2, b: float = 0.75):
        self.docs = {v.name: Counter(terms(profile(v))) for v in views}
        lengths = {n: sum(c.values()) for n, c in self.docs.items()}
        self.avg = sum(lengths.values()) / max(1, len(lengths))
        self.lengths = lengths
        df: Counter[str] = Counter()
        for counts in self.docs.values():
            df.update(counts.keys())
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.k1, self.b = k1, b

    def scores(self, text: str) -> dict[str, float]:
        query = terms(text)
        raw: dict[str, float] = {}
        for name, counts in self.docs.items():
            norm = self.k1 * (1 - self.b + self.b * self.lengths[name] / self.avg)
            raw[name] = sum(
                self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm) for t in query if t in counts
            )
        top = max(raw.values(), default=0.0)
        # Squash into 0..1 so a weak best match also reads as weak.
        return {n: round(s / (s + 2.0), 4) if top else 0.0 for n, s in raw.items()}


@cache
def _wordllama() -> Any:
    spec = importlib.util.find_spec("wordllama")
    if spec is None or spec.origin is None:
        raise BadRequest("the embedding router needs the wordllama package (pip install wordllama)")
    from wordllama import WordLlama  # type: ignore[import-untyped]

    # The weights and tokenizer ship in the wheel; pointing the cache at the package finds both there.
    return WordLlama.load(cache_dir=Path(spec.origin).parent, disable_download=True)


class Embedding:
    """Cosine similarity between WordLlama embeddings of the request and of each profile."""

    def __init__(self, views: Sequence[SpecialistView]):
        self.model = _wordllama()
        self.names = [v.name for v in views]
        self.vectors = self.model.embed([profile(v) for v in views], norm=True)

    def scores(self, text: str) -> dict[str, float]:
        query = self.model.embed([text], norm=True)[0]
        sims = self.vectors @ query
        return {n: round(max(0.0, float(s)), 4) for n, s in zip(self.names, sims, strict=True)}


class Hybrid:
    """The mean of the lexical and the embedding scores."""

    def __init__(self, views: Sequence[SpecialistView]):
        self.parts: list[TextMatcher] = [Lexical(views), Embedding(views)]

    def scores(self, text: str) -> dict[str, float]:
        each = [m.scores(text) for m in self.parts]
        return {n: round(sum(s[n] for s in each) / len(each), 4) for n in each[0]}


def matcher(method: Method, views: Sequence[SpecialistView]) -> TextMatcher:
    if method == "embedding":
        return Embedding(views)
    if method == "hybrid":
        return Hybrid(views)
    return Lexical(views)


@dataclass(frozen=True)
class Candidate:
    name: str
    score: float
    fit: float  # the capability score, or how well the text matched
    health: float

    def why(self, what: str) -> str:
        return f"{what} {self.fit:.2f} x health {self.health:.2f} = {self.score:.2f}"


def rank_by_capability(views: Sequence[SpecialistView], capability: str) -> list[Candidate]:
    """Every specialist with ``capability``, best first; a clear error naming the nearest ones if none."""
    having = [v for v in views if capability in v.capabilities]
    if not having:
        known = sorted({c for v in views for c in v.capabilities})
        near = difflib.get_close_matches(capability, known, n=3, cutoff=0.5)
        hint = f"; nearest: {', '.join(near)}" if near else (f"; known: {', '.join(known)}" if known else "")
        raise BadRequest(f"no running specialist has the capability '{capability}'{hint}")
    ranked = [
        Candidate(
            v.name, round(v.capabilities[capability] * v.health, 4), v.capabilities[capability], v.health
        )
        for v in having
    ]
    return sorted(ranked, key=lambda c: (-c.score, c.name))


def rank_by_text(views: Sequence[SpecialistView], scores: dict[str, float]) -> list[Candidate]:
    ranked = [
        Candidate(v.name, round(scores.get(v.name, 0.0) * v.health, 4), scores.get(v.name, 0.0), v.health)
        for v in views
    ]
    return sorted(ranked, key=lambda c: (-c.score, c.name))
