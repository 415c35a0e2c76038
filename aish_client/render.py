"""The only place that prints: answers to stdout as tokens arrive, progress and errors to stderr."""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from bus.wire import ToolCallFrame, ToolResultFrame


def use_color(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


class Renderer:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.err_tty = self.err.isatty()
        self.color = use_color(self.err)
        self._progress_shown = False
        self._last_char = "\n"
        self._waiting_for: str | None = None
        self._spin = 0
        # The REPL turns these on: a footer after each answer (who, first token, tokens/s).
        self.footers = False

    def _dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def token(self, text: str) -> None:
        self._waiting_for = None
        if self._progress_shown:
            self.clear_progress()
        self.out.write(text)
        self.out.flush()
        if text:
            self._last_char = text[-1]

    def end_answer(self) -> None:
        """Finish the answer on its own line, so the shell prompt does not glue onto it."""
        if self._last_char != "\n":
            self.out.write("\n")
            self.out.flush()
            self._last_char = "\n"

    def progress(self, specialist: str, tokens: int, done: bool = False) -> None:
        """An earlier stage's progress, on one rewritten stderr line, only when stderr is a terminal."""
        if not self.err_tty:
            return
        state = "done" if done else ("thinking…" if tokens == 0 else "writing…")
        self.err.write("\r\x1b[K" + self._dim(f"{specialist}: {state} {tokens} tokens"))
        self.err.flush()
        self._progress_shown = True

    def clear_progress(self) -> None:
        if self._progress_shown and self.err_tty:
            self.err.write("\r\x1b[K")
            self.err.flush()
        self._progress_shown = False

    def note(self, text: str) -> None:
        self._waiting_for = None
        self.clear_progress()
        self.err.write(self._dim(text) + "\n")
        self.err.flush()

    def tool(self, frame: ToolCallFrame | ToolResultFrame) -> None:
        """A specialist's tool call, or its result, as a dim line on stderr (the answer stays clean)."""
        if isinstance(frame, ToolCallFrame):
            args = json.dumps(frame.arguments, ensure_ascii=False)
            self.note(f"⚙ {frame.server}.{frame.tool} {args}")
        else:
            text = frame.text if len(frame.text) <= 200 else frame.text[:200] + "…"
            self.note(f"{'✗' if frame.is_error else '→'} {text}")

    def error(self, text: str) -> None:
        self._waiting_for = None
        self.clear_progress()
        prefix = "\x1b[31maish:\x1b[0m " if self.color else "aish: "
        self.err.write(prefix + text + "\n")
        self.err.flush()

    def waiting(self, specialist: str) -> None:
        """Until the first token: "apollo is thinking" with a spinner (stderr, terminals only)."""
        self._waiting_for = specialist
        self.tick()

    def tick(self) -> None:
        """Advance the spinner (the REPL calls this a few times a second)."""
        if self._waiting_for is None or not self.err_tty:
            return
        frame = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"[self._spin % 10]
        self._spin += 1
        self.err.write("\r\x1b[K" + self._dim(f"{frame} {self._waiting_for} is thinking…"))
        self.err.flush()
        self._progress_shown = True

    def stop_waiting(self) -> None:
        self._waiting_for = None
        self.clear_progress()

    def footer(self, specialist: str, first_token_ms: float | None, tokens_per_s: float | None) -> None:
        """A dim line after an answer: who answered, how soon, how fast."""
        if not self.footers:
            return
        self.end_answer()
        parts = [specialist]
        if first_token_ms is not None:
            parts.append(f"first token {first_token_ms:.0f} ms")
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:.0f} tok/s")
        self.err.write(self._dim("── " + " · ".join(parts)) + "\n")
        self.err.flush()
