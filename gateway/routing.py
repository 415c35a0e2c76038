"""Who should answer: by capability (declared score x live health) or from the text of a request.

Ways to match text to specialists, measured by ``bench/routing.py`` on ``tests/data/routing.jsonl``
(tuned on) and ``tests/data/routing_heldout.jsonl`` (never tuned on):
- ``examples`` (the default): a nearest-neighbour vote over example requests each specialist
  announces (the roster's ``examples``, its description and keywords) plus the asking user's own
  corrections (:class:`Learned`, per judgement), each represented by a WordLlama embedding joined with
  hashed words and word pairs, averaged with a classifier trained on the examples, and that average
  with a second classifier over character 3- to 5-grams (:class:`CharClassifier`).
- ``lexical``: BM25 over each specialist's profile (description, capabilities, keywords).
- ``embedding``: cosine similarity of WordLlama embeddings (``wordllama``: 256-dim static token
  embeddings, MIT, weights shipped inside the wheel and loaded from it with downloads disabled).
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import math
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from bus.discovery import SpecialistView
from bus.discovery import normalise_request as normalise
from bus.errors import BadRequest

Method = Literal["examples", "lexical", "embedding", "hybrid"]
DEFAULT_METHOD: Method = "examples"
DEFAULT_THRESHOLD = 0.7
DEFAULT_GENERALIST = "athena"

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


@dataclass(frozen=True)
class Judgement:
    """How well a request fits each specialist (0..1), why, and whether anything fits at all."""

    scores: dict[str, float]
    why: dict[str, str]
    matched: bool


class TextMatcher(Protocol):
    def scores(self, text: str) -> dict[str, float]: ...

    def judge(self, text: str, learned: Learned | None = None) -> Judgement: ...

    @property
    def trained(self) -> bool: ...

    def train(self) -> None: ...


class _ScoresOnly:
    """``judge`` for matchers that only score: matched when anything scored above zero."""

    def scores(self, text: str) -> dict[str, float]:
        raise NotImplementedError

    def judge(self, text: str, learned: Learned | None = None) -> Judgement:
        """Corrections (``learned``) are for the examples router only: the others ignore them."""
        scores = self.scores(text)
        return Judgement(scores, {}, max(scores.values(), default=0.0) > 0)

    @property
    def trained(self) -> bool:
        return True

    def train(self) -> None:
        """Nothing to train."""


class Lexical(_ScoresOnly):
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
def _one_blas_thread() -> None:
    """Our matrices are small: OpenBLAS's threads only wait for each other, and on a busy 2-core
    machine a 1,200 x 256 product took 30 ms with two threads against 0.5 ms with one."""
    threadpool_limits(1, user_api="blas")


@cache
def _wordllama() -> Any:
    spec = importlib.util.find_spec("wordllama")
    if spec is None or spec.origin is None:
        raise BadRequest("the embedding router needs the wordllama package (pip install wordllama)")
    from wordllama import WordLlama  # type: ignore[import-untyped]

    _one_blas_thread()
    # The weights and tokenizer ship in the wheel; pointing the cache at the package finds both there.
    return WordLlama.load(cache_dir=Path(spec.origin).parent, disable_download=True)


class Embedding(_ScoresOnly):
    """Cosine similarity between WordLlama embeddings of the request and of each profile."""

    def __init__(self, views: Sequence[SpecialistView]):
        self.model = _wordllama()
        self.names = [v.name for v in views]
        self.vectors = self.model.embed([profile(v) for v in views], norm=True)

    def scores(self, text: str) -> dict[str, float]:
        query = self.model.embed([text], norm=True)[0]
        sims = self.vectors @ query
        return {n: round(max(0.0, float(s)), 4) for n, s in zip(self.names, sims, strict=True)}


class Hybrid(_ScoresOnly):
    """The mean of the lexical and the embedding scores."""

    def __init__(self, views: Sequence[SpecialistView]):
        self.parts: list[TextMatcher] = [Lexical(views), Embedding(views)]

    def scores(self, text: str) -> dict[str, float]:
        each = [m.scores(text) for m in self.parts]
        return {n: round(sum(s[n] for s in each) / len(each), 4) for n in each[0]}


# The examples router: each text is its WordLlama embedding joined with its words, word pairs and
# word starts hashed into _HASHED slots (both halves unit length), compared by cosine; the K nearest
# examples vote with weight similarity**_POWER. K, the power, the wording weight and the floors below
# were chosen on tests/data/routing.jsonl and the two seen sets (see bench/routing.py), never on
# tests/data/routing_heldout3.jsonl.
K_NEAREST = 7
_POWER = 2
_HASHED = 4096
_PREFIX = 5
# The classifier: features scaled by _SCALE, _EPOCHS of gradient descent at _RATE, weight decay _DECAY.
_SCALE = 5.0
_EPOCHS = 200
_RATE = 1.0
_DECAY = 1e-4
WORDING = 1.0  # the wording half's weight against the meaning half
CLASSIFIER_SHARE = 0.5  # the classifier's share of a score; the vote has the rest
# Below this similarity the nearest example is no match: the request goes to the generalist. Longer
# requests share a smaller part of their words with any example, so they need less.
MIN_SIMILARITY = 0.25
MIN_SIMILARITY_LONG = 0.15
_LONG_WORDS = 6
# A user's correction weighs as much as this many examples in the vote; and a request at least
# PULL_FROM similar to one of the user's corrections is pulled towards its specialist, the more the
# closer (at similarity 1 entirely): the user said where requests like it belong.
LEARNED_WEIGHT = 3.0
PULL_FROM = 0.6
# What of a long request is read: its start and its end (a pasted log or document usually comes with
# its instruction before or after it), _MAX_CHARS in all. Enough to tell what it is about; the cost of
# a decision grows with length (a 2,000-character paste took 2.4 ms of CPU whole, 1.3 ms clipped).
_MAX_CHARS = 1000
_TAIL_CHARS = 300


def _ends(text: str, limit: int = _MAX_CHARS) -> str:
    if len(text) <= limit:
        return text
    tail = limit * _TAIL_CHARS // _MAX_CHARS
    return f"{text[: limit - tail]}\n{text[-tail:]}"


_WORD_RE_ANY = re.compile(r"\w+")
# Words that say nothing about the topic (more English ones, and those of the languages people most
# often write to us in besides English): left out of the wording half, so two Spanish requests do not
# match on "cómo" and "de la", nor two English ones on "did" and "make".
_OTHER_FUNCTION_WORDS = """
    did done doing has have had having was were been being am not no yes there their they them then than
    would could might must shall may one some any all each every very really actually just also only
    please help want need like get got make made give tell let know think thing things way use using
    lot lots much many more most other another about up out over s t m ll re ve d don isn doesn didn
    u im ok okay hi hey thanks
    el la los las un una unos unas de del al y o que qué en es son por para con como cómo cuál mi mis tu su
    sus se lo le nos este esta esto estos ese esa hay muy más pero si no
    le la les un une des du de et ou que qu quel quelle quels est sont pour par avec comment dans ce cet
    cette ces mon ma mes ton ta son sa ses notre nos votre vos il elle nous vous ils on se ne pas plus
    der die das den dem des ein eine einen einem einer und oder ist sind für mit wie was warum wenn in im
    zu zum zur von auf aus bei mein meine unser unsere ich wir sie es nicht auch
    il lo la gli le un uno una di del della che e è sono per con come cosa perché in nel nella questo questa
    o os as um uma do da dos das e é são para com como por que no na nos nas meu minha nosso nossa este
    esta isso
    de het een en of is zijn voor met hoe wat waarom in op van dit deze mijn ons onze ik we je niet
    """
_FUNCTION_WORDS = _STOP | frozenset(_OTHER_FUNCTION_WORDS.split())


_UNSPACED = re.compile(r"[\u1100-\u11ff\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def _fold(text: str) -> str:
    """Lowercase without accents: 'intégrer' and 'integrate' should share their start."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _grams(text: str) -> dict[int, float]:
    """The request's words, word pairs and word starts (five letters: technical words look alike across
    European languages), hashed into ``_HASHED`` slots, as a unit vector (sparse)."""
    words = [w for w in _WORD_RE_ANY.findall(_fold(_ends(text))) if w not in _FUNCTION_WORDS]
    stems = [stem(w) for w in words]
    grams = [*stems, *(f"{a} {b}" for a, b in itertools.pairwise(stems))]
    grams += [f"{w[:_PREFIX]}-" for w in words if len(w) > _PREFIX]
    # Chinese and Japanese put no spaces between words (a "word" here is a whole clause), and Korean
    # glues particles on: their character pairs stand in for words.
    grams += [w[i : i + 2] for w in words if _UNSPACED.search(w) for i in range(len(w) - 1)]
    counts: Counter[int] = Counter(zlib.crc32(g.encode()) % _HASHED for g in grams)
    norm = math.sqrt(sum(c * c for c in counts.values())) or 1.0
    return {slot: c / norm for slot, c in counts.items()}


@dataclass(frozen=True)
class Query:
    """One request, represented once for both the vote and the classifier."""

    dense: np.ndarray  # unit embedding (256)
    slots: np.ndarray  # hashed word slots
    values: np.ndarray  # their weights (unit length together, times WORDING)


def represent(text: str) -> Query:
    grams = _grams(text)
    return Query(
        _embed([text])[0],
        np.fromiter(grams.keys(), dtype=np.intp, count=len(grams)),
        np.fromiter(grams.values(), dtype=np.float32, count=len(grams)) * WORDING,
    )


class Vectors:
    """Texts as meaning (a WordLlama embedding) and wording (hashed words), in equal parts, compared by
    cosine. The wording half is sparse, so a query touches only its own slots."""

    def __init__(self, texts: Sequence[str]):
        self.dense = _embed_examples(texts)
        # Slot-major, so a query gathers a few contiguous rows (its slots) instead of strided columns.
        self.hashed = np.zeros((_HASHED, len(texts)), dtype=np.float32)
        # The same wording as (row, slot, value) triples in row order, for training the classifier.
        # Every row starts with a zero at slot 0, so no row is empty (np.add.reduceat needs that).
        rows, slots, values = [], [], []
        for row, text in enumerate(texts):
            rows.append(row)
            slots.append(0)
            values.append(0.0)
            for slot, value in _grams(text).items():
                self.hashed[slot, row] = value * WORDING
                rows.append(row)
                slots.append(slot)
                values.append(value * WORDING)
        self.rows = np.array(rows, dtype=np.intp)
        self.slots = np.array(slots, dtype=np.intp)
        self.values = np.array(values, dtype=np.float32)
        # Each half is unit length (the wording half WORDING long) or empty.
        halves = (np.linalg.norm(self.dense, axis=1) > 0) + self.hashed.any(axis=0) * WORDING**2
        self.norms = np.sqrt(np.maximum(halves, 1e-9)).astype(np.float32)

    def similarity(self, query: Query) -> np.ndarray:
        """Cosine similarity of ``query`` to every row."""
        sims = self.dense @ query.dense
        if len(query.slots):
            sims = sims + query.values @ self.hashed[query.slots]
        halves = float(np.linalg.norm(query.dense) > 0) + float(np.dot(query.values, query.values))
        result: np.ndarray = sims / (self.norms * math.sqrt(max(halves, 1e-9)))
        return result


class Classifier:
    """Softmax regression over the same two halves (scaled by _SCALE): where the vote copies its
    neighbours, this learns which directions and words mark each specialist, and generalises better
    (leave-one-set-out over the labelled sets: 93 % alone, 94.5 % averaged with the vote)."""

    def __init__(self, vectors: Vectors, labels: Sequence[int], weights: np.ndarray, classes: int):
        share = (weights / weights.sum()).astype(np.float32)
        self.dense, self.hashed, self.bias = _fit_softmax(
            vectors.dense * _SCALE,
            (vectors.rows, vectors.slots, vectors.values * _SCALE, _HASHED),
            labels,
            share,
            classes,
            _EPOCHS,
        )

    def probabilities(self, query: Query) -> np.ndarray:
        logits = (query.dense * _SCALE) @ self.dense + self.bias
        if len(query.slots):
            logits = logits + (query.values * _SCALE) @ self.hashed[query.slots]
        return _softmax(logits[None, :])[0]


Sparse = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # (row, slot, value) triples in row order; slots


def _fit_softmax(
    dense: np.ndarray, sparse: Sparse, labels: Sequence[int], share: np.ndarray, classes: int, epochs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax regression over dense columns and sparse slots, by full-batch gradient descent from zero
    (deterministic), each row's loss weighted by ``share``. Every row has at least one sparse triple
    (np.add.reduceat needs that). Returns the dense weights, the slot weights and the biases."""
    rows, slots, values, n_slots = sparse
    n = len(labels)
    target = np.zeros((n, classes), dtype=np.float32)
    target[np.arange(n), np.asarray(labels, dtype=np.intp)] = 1.0
    share = share.astype(np.float32)[:, None]
    w_dense = np.zeros((dense.shape[1], classes), dtype=np.float32)
    w_slots = np.zeros((n_slots, classes), dtype=np.float32)
    bias = np.zeros(classes, dtype=np.float32)
    # Sparse products by sorting once: row starts for the forward sum, slot groups for the gradient.
    row_starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    by_slot = np.argsort(slots, kind="stable")
    sorted_slots = slots[by_slot]
    slot_starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
    used_slots = sorted_slots[slot_starts]
    for _ in range(epochs):
        logits = dense @ w_dense + bias
        logits += np.add.reduceat(values[:, None] * w_slots[slots], row_starts, axis=0)
        error = (_softmax(logits) - target) * share
        contributions = (values[:, None] * error[rows])[by_slot]
        grad_slots = np.zeros_like(w_slots)
        grad_slots[used_slots] = np.add.reduceat(contributions, slot_starts, axis=0)
        w_dense -= _RATE * (dense.T @ error + _DECAY * w_dense)
        w_slots -= _RATE * (grad_slots + _DECAY * w_slots)
        bias -= _RATE * error.sum(axis=0)
    return w_dense, w_slots, bias


# The character classifier: TF-IDF of character 3- to 5-grams (of _CHAR_CHARS characters, see _ends,
# lowercased without accents), over the grams at least two examples share, features scaled by
# _CHAR_SCALE, softmax regression for _CHAR_EPOCHS. It sees what words miss: code and log syntax,
# word forms and inflections in other languages, and Chinese, Japanese and Korean without spaces.
# Chosen on the seen sets left out in turn and on routing_heldout4-6 (bench/routing.py), never on
# routing_heldout7: alone it scores about as well as the rest; averaged with them it adds 2.5 points.
_CHAR_GRAMS = (3, 4, 5)
_CHAR_CHARS = 600
_CHAR_SCALE = 8.0
_CHAR_EPOCHS = 100
CHAR_SHARE = 0.5  # the character classifier's share of a score; the vote and word classifier the rest


def _char_text(text: str) -> str:
    return " " + " ".join(_fold(_ends(text, _CHAR_CHARS)).split()) + " "


_GRAM_BASE = np.uint64(0x100000001B3)  # FNV's prime: a 64-bit polynomial hash of each n-gram


def _char_grams(text: str) -> tuple[np.ndarray, np.ndarray]:
    """The text's distinct character n-grams (as 64-bit hashes, sorted) and how often each occurs,
    computed by numpy over the code points rather than one string slice at a time."""
    points = np.frombuffer(_char_text(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    hashes = []
    for n in _CHAR_GRAMS:
        count = len(points) - n + 1
        if count > 0:
            h = np.full(count, n, dtype=np.uint64)
            for k in range(n):
                h = h * _GRAM_BASE + points[k : k + count]
            hashes.append(h)
    if not hashes:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.intp)
    grams, counts = np.unique(np.concatenate(hashes), return_counts=True)
    return grams, counts


class CharClassifier:
    """Softmax regression over the character n-grams' TF-IDF (sublinear counts, unit length), over
    the n-grams at least two examples share."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], classes: int):
        each = [_char_grams(t) for t in texts]
        n = len(texts)
        every, df = np.unique(np.concatenate([g for g, _ in each]), return_counts=True)
        self.known = every[df >= 2]
        self.idf = (np.log((1 + n) / (1 + df[df >= 2])) + 1).astype(np.float32)
        rows, slots, values = [], [], []
        for row, (grams, counts) in enumerate(each):
            found, times = self._known(grams, counts)
            weights = self._tfidf(found, times)
            rows.append(np.full(len(found) + 1, row, dtype=np.intp))  # and a zero at slot 0: no row
            slots.append(np.r_[0, found].astype(np.intp))  # is empty
            values.append(np.r_[0.0, weights * _CHAR_SCALE].astype(np.float32))
        # At least one slot: a roster whose examples share no n-gram (one tiny specialist) still trains.
        sparse = (
            np.concatenate(rows),
            np.concatenate(slots),
            np.concatenate(values),
            max(len(self.known), 1),
        )
        no_dense = np.zeros((n, 0), dtype=np.float32)
        share = np.full(n, 1.0 / max(n, 1), dtype=np.float32)
        _, self.weights, self.bias = _fit_softmax(no_dense, sparse, labels, share, classes, _CHAR_EPOCHS)

    def _known(self, grams: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The slots of the n-grams the examples share, and their counts."""
        at = np.minimum(np.searchsorted(self.known, grams), max(len(self.known) - 1, 0))
        hit = self.known[at] == grams if len(self.known) else np.zeros(len(grams), dtype=bool)
        return at[hit], counts[hit].astype(np.float32)

    def _tfidf(self, slots: np.ndarray, counts: np.ndarray) -> np.ndarray:
        weights = (1 + np.log(counts)) * self.idf[slots]
        norm = float(np.linalg.norm(weights))
        result: np.ndarray = weights / norm if norm else weights
        return result

    def probabilities(self, text: str) -> np.ndarray:
        slots, counts = self._known(*_char_grams(text))
        logits = self.bias + (self._tfidf(slots, counts) * _CHAR_SCALE) @ self.weights[slots]
        return _softmax(logits[None, :])[0]


# Trained character classifiers by their examples: training takes seconds, and a matcher is rebuilt
# with the same examples whenever discovery sees the same roster again (and in every test).
@lru_cache(maxsize=4)
def _char_classifier(texts: tuple[str, ...], labels: tuple[int, ...], classes: int) -> CharClassifier:
    return CharClassifier(texts, labels, classes)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def _embed(texts: Sequence[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 256), dtype=np.float32)
    dense: np.ndarray = _wordllama().embed([_ends(t) for t in texts], norm=True).astype(np.float32)
    return dense


# Example embeddings by text: a matcher rebuilt after a correction embeds only what is new.
_EMBEDDED: dict[str, np.ndarray] = {}
_EMBEDDED_MAX = 50_000


def _embed_examples(texts: Sequence[str]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 256), dtype=np.float32)
    vectors = {t: v for t in texts if (v := _EMBEDDED.get(t)) is not None}
    new = [t for t in dict.fromkeys(texts) if t not in vectors]
    if new:
        embedded = dict(zip(new, _embed(new), strict=True))
        vectors.update(embedded)
        if len(_EMBEDDED) + len(new) > _EMBEDDED_MAX:
            _EMBEDDED.clear()
        _EMBEDDED.update(embedded)
    return np.stack([vectors[t] for t in texts])


def _clip(text: str, n: int = 60) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= n else one_line[: n - 1] + "…"


class Learned:
    """One user's corrections (request text, specialist), as a small set of extra voters: each weighs
    as much as ``LEARNED_WEIGHT`` examples in the vote, and the very request they were made for goes
    to their specialist outright. Kept apart from the examples (and the classifier), so a correction
    takes effect at once, for the user who made it only, without retraining anything."""

    def __init__(self, corrections: Sequence[tuple[str, str]]):
        kept = [(t, n) for t, n in corrections if t.strip()]
        self.texts = [t for t, _ in kept]
        self.labels = [n for _, n in kept]
        self.exact = {normalise(t): n for t, n in kept}
        self.vectors = Vectors(self.texts) if kept else None

    def __len__(self) -> int:
        return len(self.texts)


class Examples:
    """A nearest-neighbour vote over the specialists' example requests (plus, per judgement, the asking
    user's corrections), averaged with two classifiers trained on the examples once ``train()`` has run
    (one over the same meaning and words, one over character n-grams; training takes a few seconds: the
    gateway runs it in a worker thread and votes alone until then)."""

    def __init__(self, views: Sequence[SpecialistView], learned: Sequence[tuple[str, str]] = ()):
        texts: list[str] = []
        self.labels: list[str] = []
        for v in views:
            for t in [*v.examples, v.description, *v.keywords]:
                if t.strip():
                    texts.append(t)
                    self.labels.append(v.name)
        self.names = [v.name for v in views]
        self.texts = texts
        self.weights = np.ones(len(texts), dtype=np.float32)
        self.vectors = Vectors(texts)
        self.classifier: Classifier | None = None
        self.chars: CharClassifier | None = None
        # Corrections every judgement counts unless it is given its own (tests, benches).
        self.learned = Learned(learned) if learned else None

    @property
    def trained(self) -> bool:
        return self.classifier is not None or not self.texts

    def train(self) -> None:
        if not self.trained:
            labels = [self.names.index(n) for n in self.labels]
            self.classifier = Classifier(self.vectors, labels, self.weights, len(self.names))
            self.chars = _char_classifier(tuple(self.texts), tuple(labels), len(self.names))

    def scores(self, text: str) -> dict[str, float]:
        return self.judge(text).scores

    def judge(self, text: str, learned: Learned | None = None) -> Judgement:
        learned = learned if learned is not None else self.learned
        scores = dict.fromkeys(self.names, 0.0)
        why: dict[str, str] = {}
        remembered = learned.exact.get(normalise(text)) if learned else None
        if remembered is not None and remembered in scores:
            scores[remembered] = 1.0
            why[remembered] = "you sent this request to it before"
            return Judgement(scores, why, True)
        if not len(self.texts):
            return Judgement(scores, why, False)
        query = represent(text)
        sims = self.vectors.similarity(query)
        # Voters: (similarity, weight, specialist, text, a correction?), the K nearest of both kinds.
        voters = [
            (float(sims[i]), 1.0, self.labels[i], self.texts[i], False) for i in np.argsort(-sims)[:K_NEAREST]
        ]
        pull, pulled_to = 0.0, ""
        if learned and learned.vectors is not None:
            mine = learned.vectors.similarity(query)
            closest = int(np.argmax(mine))
            if learned.labels[closest] in scores:
                pull = max(0.0, (float(mine[closest]) - PULL_FROM) / (1 - PULL_FROM))
                pulled_to = learned.labels[closest]
            voters += [
                (float(mine[i]), LEARNED_WEIGHT, learned.labels[i], learned.texts[i], True)
                for i in np.argsort(-mine)[:K_NEAREST]
                if learned.labels[i] in scores
            ]
            voters = sorted(voters, key=lambda v: -v[0])[:K_NEAREST]
        votes: dict[str, float] = {}
        for sim, weight, name, _, _ in voters:
            votes[name] = votes.get(name, 0.0) + weight * max(0.0, sim) ** _POWER
        total = sum(votes.values()) or 1.0
        probabilities = self.classifier.probabilities(query) if self.classifier else None
        by_chars = self.chars.probabilities(text) if self.chars else None
        for name in self.names:
            vote = votes.get(name, 0.0) / total
            reasons = []
            if probabilities is not None:
                p = float(probabilities[self.names.index(name)])
                vote = (1 - CLASSIFIER_SHARE) * vote + CLASSIFIER_SHARE * p
                if p >= 0.01:
                    reasons.append(f"classifier {p:.2f}")
            if by_chars is not None:
                p = float(by_chars[self.names.index(name)])
                vote = (1 - CHAR_SHARE) * vote + CHAR_SHARE * p
                if p >= 0.01:
                    reasons.append(f"characters {p:.2f}")
            if pull > 0:
                vote = (1 - pull) * vote + (pull if name == pulled_to else 0.0)
            near = [v for v in voters if v[2] == name]
            if near:
                sim, _, _, nearest, corrected = near[0]
                source = "your correction" if corrected else "example"
                reasons.append(
                    f"{len(near)} of {len(voters)} nearest; nearest {source} '{_clip(nearest)}' ({sim:.2f})"
                )
            scores[name] = round(vote, 4)
            if reasons:
                why[name] = "; ".join(reasons)
        floor = MIN_SIMILARITY_LONG if len(text.split()) >= _LONG_WORDS else MIN_SIMILARITY
        return Judgement(scores, why, bool(voters[0][0] >= floor))


def matcher(
    method: Method,
    views: Sequence[SpecialistView],
    learned: Sequence[tuple[str, str]] = (),
    *,
    train: bool = True,
) -> TextMatcher:
    """The text matcher ``method`` over ``views``; ``train=False`` leaves the (slow) training for later."""
    if method == "examples":
        examples = Examples(views, learned)
        if train:
            examples.train()
        return examples
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
    because: str = ""  # what the fit rests on (for text: the nearest examples)

    def why(self, what: str) -> str:
        said = f"{what} {self.fit:.2f} x health {self.health:.2f} = {self.score:.2f}"
        return f"{said} ({self.because})" if self.because else said


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


def rank_by_text(views: Sequence[SpecialistView], judgement: Judgement) -> list[Candidate]:
    scores = judgement.scores
    ranked = [
        Candidate(
            v.name,
            round(scores.get(v.name, 0.0) * v.health, 4),
            scores.get(v.name, 0.0),
            v.health,
            judgement.why.get(v.name, ""),
        )
        for v in views
    ]
    return sorted(ranked, key=lambda c: (-c.score, c.name))
