"""The aish pipeline language: tokens with shlex quoting rules, parsed into a typed pipeline.

    pipeline := stage ('|' stage)* [('>' | '>>') WORD]
    stage    := 'echo' WORD*                      (first stage only)
              | targets ['-m' MODEL] ['<<' WORD | WORD+]   (the words are the stage's own message)
              | QUOTED WORD*                      (a question with no name: routed, as @auto)
    targets  := target (',' target)*  |  '{' target ('|' target)* '}'
    target   := NAME | '@'CAPABILITY

Syntax errors carry the 1-based column so they can be shown with a caret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from bus.sessions import AUTO
from bus.subjects import NAME_RE
from bus.wire import MODEL_RE

__all__ = [
    "AUTO",
    "Ask",
    "Echo",
    "Pipeline",
    "PipelineSyntaxError",
    "Redirect",
    "Target",
    "parse",
    "tokenize",
]


class PipelineSyntaxError(ValueError):
    def __init__(self, message: str, column: int, source: str = ""):
        super().__init__(message)
        self.message = message
        self.column = column
        self.source = source

    def render(self) -> str:
        """The message, the source line and a caret under the column."""
        caret = " " * (self.column - 1) + "^"
        return f"syntax error at column {self.column}: {self.message}\n  {self.source}\n  {caret}"

    def __str__(self) -> str:
        return f"syntax error at column {self.column}: {self.message}"

    def one_line(self) -> str:
        """The message and the source in one line (the REPL shows the caret under it instead)."""
        return f"{self} in: {' '.join(self.source.split())[:200]}"


class Kind(Enum):
    WORD = "word"
    PIPE = "|"
    COMMA = ","
    HEREDOC = "<<"
    WRITE = ">"
    APPEND = ">>"
    LBRACE = "{"
    RBRACE = "}"
    END = "end of input"


@dataclass(frozen=True)
class Token:
    kind: Kind
    text: str
    column: int
    quoted: bool = False


_OPERATORS = {"|": Kind.PIPE, ",": Kind.COMMA, "{": Kind.LBRACE, "}": Kind.RBRACE}


def tokenize(source: str) -> list[Token]:
    """Split like a POSIX shell (shlex rules for quotes and backslashes), plus aish's operators."""
    tokens: list[Token] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if ch.isspace():
            i += 1
            continue
        col = i + 1
        if ch in _OPERATORS:
            tokens.append(Token(_OPERATORS[ch], ch, col))
            i += 1
            continue
        if source.startswith("<<", i):
            tokens.append(Token(Kind.HEREDOC, "<<", col))
            i += 2
            continue
        if ch == "<":
            raise PipelineSyntaxError(
                "'<' is not supported; use '<< \"message\"' or pipe text in", col, source
            )
        if ch == ">":
            append = source.startswith(">>", i)
            tokens.append(Token(Kind.APPEND if append else Kind.WRITE, ">>" if append else ">", col))
            i += 2 if append else 1
            continue
        word: list[str] = []
        quoted = False
        while i < n and not source[i].isspace() and source[i] not in _OPERATORS and source[i] not in "<>":
            c = source[i]
            if c == "'":
                end = source.find("'", i + 1)
                if end < 0:
                    raise PipelineSyntaxError("unterminated single quote", i + 1, source)
                word.append(source[i + 1 : end])
                quoted = True
                i = end + 1
            elif c == '"':
                start = i
                i += 1
                while True:
                    if i >= n:
                        raise PipelineSyntaxError("unterminated double quote", start + 1, source)
                    c = source[i]
                    if c == '"':
                        i += 1
                        break
                    if c == "\\" and i + 1 < n and source[i + 1] in '"\\':
                        word.append(source[i + 1])
                        i += 2
                        continue
                    word.append(c)
                    i += 1
                quoted = True
            elif c == "\\":
                if i + 1 >= n:
                    raise PipelineSyntaxError("a trailing backslash escapes nothing", i + 1, source)
                word.append(source[i + 1])
                i += 2
            else:
                word.append(c)
                i += 1
        tokens.append(Token(Kind.WORD, "".join(word), col, quoted))
    tokens.append(Token(Kind.END, "", n + 1))
    return tokens


@dataclass(frozen=True)
class Target:
    name: str
    column: int
    capability: bool = False

    def __str__(self) -> str:
        return f"@{self.name}" if self.capability else self.name


@dataclass(frozen=True)
class Echo:
    text: str
    column: int


@dataclass(frozen=True)
class Ask:
    targets: tuple[Target, ...]
    message: str | None
    column: int
    grouped: bool = False
    # `apollo -m ollama:qwen2.5:7b`: the model this stage asks for (None: the specialist's own).
    model: str | None = None

    @property
    def fan_out(self) -> bool:
        return len(self.targets) > 1 or self.grouped


@dataclass(frozen=True)
class Redirect:
    path: str
    append: bool
    column: int


@dataclass(frozen=True)
class Pipeline:
    source: Echo | None
    stages: tuple[Ask, ...]
    redirect: Redirect | None = None
    text: str = field(default="", compare=False)


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.tokens = tokenize(source)
        self.pos = 0

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def fail(self, message: str, tok: Token | None = None) -> PipelineSyntaxError:
        return PipelineSyntaxError(message, (tok or self.peek()).column, self.source)

    def expect(self, kind: Kind, what: str) -> Token:
        tok = self.peek()
        if tok.kind is not kind:
            found = "the end of the line" if tok.kind is Kind.END else f"'{tok.text}'"
            raise self.fail(f"expected {what}, found {found}", tok)
        return self.take()

    def pipeline(self) -> Pipeline:
        if self.peek().kind is Kind.END:
            raise self.fail('empty pipeline: name a specialist, e.g. apollo "question"')
        source: Echo | None = None
        stages: list[Ask] = []
        first = self.peek()
        if first.kind is Kind.WORD and first.text == "echo" and not first.quoted:
            self.take()
            words = []
            while self.peek().kind is Kind.WORD:
                words.append(self.take().text)
            source = Echo(" ".join(words), first.column)
            if self.peek().kind is Kind.PIPE:
                self.take()
                stages.append(self.stage())
            elif self.peek().kind not in (Kind.END, Kind.WRITE, Kind.APPEND):
                raise self.fail("expected '|' after echo's text")
        else:
            stages.append(self.stage())
        while self.peek().kind is Kind.PIPE:
            self.take()
            stages.append(self.stage())
        redirect = None
        if self.peek().kind in (Kind.WRITE, Kind.APPEND):
            op = self.take()
            path = self.expect(Kind.WORD, "a file name after " + op.text)
            redirect = Redirect(path.text, op.kind is Kind.APPEND, op.column)
        if self.peek().kind is not Kind.END:
            tok = self.peek()
            raise self.fail(f"unexpected '{tok.text}'", tok)
        if not stages and redirect is None:
            raise PipelineSyntaxError(
                'echo needs a specialist to talk to: echo "text" | apollo', first.column, self.source
            )
        return Pipeline(source, tuple(stages), redirect, self.source)

    def target(self) -> Target:
        tok = self.expect(Kind.WORD, "a specialist name or @capability")
        text = tok.text
        capability = text.startswith("@") and not tok.quoted
        name = text[1:] if capability else text
        if name == "echo" and not tok.quoted:
            raise self.fail("echo can only start a pipeline", tok)
        if not NAME_RE.match(name):
            what = "capability" if capability else "specialist name"
            raise self.fail(f"'{text}' is not a valid {what} (lowercase letters, digits, '-')", tok)
        return Target(name, tok.column, capability)

    def stage(self) -> Ask:
        start = self.peek()
        if start.kind is Kind.WORD and start.quoted:
            # A quoted question where a name would be: the gateway picks who answers it (@auto).
            words = []
            while self.peek().kind is Kind.WORD:
                words.append(self.take().text)
            return Ask((Target(AUTO, start.column, True),), " ".join(words), start.column)
        grouped = False
        if start.kind is Kind.LBRACE:
            self.take()
            targets = [self.target()]
            while self.peek().kind is Kind.PIPE:
                self.take()
                targets.append(self.target())
            self.expect(Kind.RBRACE, "'}' to close the group")
            grouped = True
        else:
            targets = [self.target()]
            while self.peek().kind is Kind.COMMA:
                self.take()
                targets.append(self.target())
        model: str | None = None
        flag = self.peek()
        if flag.kind is Kind.WORD and not flag.quoted and flag.text in ("-m", "--model"):
            self.take()
            model = self.expect(Kind.WORD, f"a model after {flag.text} (e.g. ollama:qwen2.5:7b)").text
            if not MODEL_RE.match(model):
                raise self.fail(f"'{model}' is not a model name (PROVIDER:MODEL, no spaces)", flag)
        message: str | None = None
        if self.peek().kind is Kind.HEREDOC:
            self.take()
            message = self.expect(Kind.WORD, "a message after <<").text
        elif self.peek().kind is Kind.WORD:
            words = []
            while self.peek().kind is Kind.WORD:
                words.append(self.take().text)
            message = " ".join(words)
        return Ask(tuple(targets), message, start.column, grouped, model)


def parse(source: str) -> Pipeline:
    """Parse one aish pipeline, or raise :class:`PipelineSyntaxError` with the column."""
    return _Parser(source).pipeline()
