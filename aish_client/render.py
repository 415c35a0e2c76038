"""The only place that prints: answers to stdout as tokens arrive, progress and errors to stderr.

On a terminal (and without NO_COLOR) answers are rendered as markdown a block at a time: the raw text
streams as it arrives, and each finished block (a paragraph, a list, a fenced code block) is redrawn
rendered. rich is imported only then, so a piped one-shot `aish` never pays for it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # a one-shot aish renders without loading the wire models (pydantic)
    from bus.wire import ToolCallFrame, ToolResultFrame


def silence_stdout() -> None:
    """Drop what is left in stdout's buffer, so Python's own flush at exit adds no traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


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
        # On for the REPL and for one-shot answers on a terminal: a footer after each answer (who, first
        # token, tokens/s, model, tokens in/out).
        self.footers = False
        # Answers rendered as markdown (see the module docstring); set by :meth:`render_markdown`.
        self._markdown: MarkdownStream | None = None
        # --json: one JSON object per line per event on stdout, nothing else there.
        self.json_events = False
        # Where notes shown only once are remembered (the data dir); None: once per process.
        self.notes_dir: Path | None = None
        self._noted: set[str] = set()

    @classmethod
    def for_answers(cls, data_dir: Path, json_events: bool) -> Renderer:
        """The renderer of an answer: --json events, or markdown and a footer on a terminal."""
        renderer = cls()
        renderer.notes_dir = data_dir
        renderer.json_events = json_events
        if not json_events:
            renderer.footers = renderer.err_tty
            renderer.render_markdown()
        return renderer

    def once(self, key: str, text: str) -> None:
        """A note shown the first time only (remembered in the data dir)."""
        if key in self._noted:
            return
        self._noted.add(key)
        marker = self.notes_dir / f"noted-{key}" if self.notes_dir is not None else None
        if marker is not None and marker.exists():
            return
        self.note(text)
        if marker is not None:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError:  # a read-only data dir: the note shows again next time, no harm
                pass

    def render_markdown(self) -> None:
        """Render answers as markdown when stdout is a terminal that takes colour."""
        if use_color(self.out) and not self.json_events:
            self._markdown = MarkdownStream(self.out)

    def event(self, kind: str, **fields: Any) -> None:
        """One --json event: a JSON object on its own line (docs/aish-json.md)."""
        self.out.write(json.dumps({"event": kind, **fields}, ensure_ascii=False) + "\n")
        self.out.flush()

    def answer(self, text: str) -> None:
        """A piece of the answer being shown (markdown on a terminal, else as it comes)."""
        if self._markdown is None:
            self.token(text)
            return
        self._waiting_for = None
        if self._progress_shown:
            self.clear_progress()
        self._markdown.feed(text)
        if text:
            self._last_char = "\n" if self._markdown.at_line_start() else text[-1]

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
        if self._markdown is not None and self._markdown.pending():
            self._markdown.finish()
            self._last_char = "\n"
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
        if frame.type == "tool_call":
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

    def footer(
        self,
        specialist: str,
        first_token_ms: float | None,
        tokens_per_s: float | None,
        *,
        model: str | None = None,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
    ) -> None:
        """A dim line after an answer: who answered, how soon, how fast, with which model, how many
        tokens went in and came out."""
        if not self.footers:
            return
        self.end_answer()
        parts = [specialist]
        if first_token_ms is not None:
            parts.append(f"first token {first_token_ms:.0f} ms")
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:.0f} tok/s")
        if tokens_out is not None:
            parts.append(f"{tokens_in if tokens_in is not None else '?'} in / {tokens_out} out")
        if model:
            parts.append(model)
        self.err.write(self._dim("── " + " · ".join(parts)) + "\n")
        self.err.flush()

    def truncated(self, max_tokens: int | None) -> None:
        """The answer stopped at its token cap, not because it was finished: say so where it ends."""
        self.end_answer()
        cap = f" ({max_tokens})" if max_tokens else ""
        mark = f"[… stopped at max tokens{cap}: raise it with --max-tokens N or -o max_tokens=N]"
        self.err.write(("\x1b[33m" + mark + "\x1b[0m" if self.color else mark) + "\n")
        self.err.flush()


class MarkdownStream:
    """Markdown a block at a time: raw text streams; each finished block is redrawn rendered.

    A block ends at a blank line outside a fenced code block, or at the fence that closes one. Redrawing
    moves the cursor back over the rows the raw text took (counted at the terminal's width).
    """

    def __init__(self, out: TextIO):
        from rich.console import Console

        self.out = out
        self.console = Console(file=out, force_terminal=True, soft_wrap=False, highlight=False)
        self.width = self.console.width
        self.buffer = ""  # the current block, raw, as shown
        self.blocks = 0

    def at_line_start(self) -> bool:
        return not self.buffer or self.buffer.endswith("\n")

    def pending(self) -> bool:
        return bool(self.buffer.strip())

    def feed(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.buffer += text
        while (cut := self._block_end()) is not None:
            block, self.buffer = self.buffer[:cut], self.buffer[cut:]
            self._redraw(block, self.buffer)

    def _block_end(self) -> int | None:
        in_fence = False
        pos = 0
        for line in self.buffer.splitlines(keepends=True):
            if not line.endswith("\n"):
                return None
            pos += len(line)
            if line.lstrip().startswith(("```", "~~~")):
                if in_fence:
                    return pos
                in_fence = True
            elif not line.strip() and not in_fence and self.buffer[:pos].strip():
                return pos
        return None

    def _rows(self, text: str) -> int:
        from rich.cells import cell_len

        lines = text.split("\n")
        return sum(max(1, -(-cell_len(line) // self.width)) for line in lines[:-1]) + (
            -(-cell_len(lines[-1]) // self.width) if lines[-1] else 0
        )

    def _redraw(self, block: str, rest: str) -> None:
        from rich.markdown import Markdown

        shown = block + rest
        # Back to the first row of the raw text (the cursor is on its last row, or just below it when it
        # ends with a newline), and clear from there down.
        up = self._rows(shown) - (0 if shown.endswith("\n") else 1)
        if up >= self.console.height - 1:
            # Part of it has scrolled off the screen, where the cursor cannot go: leave it raw.
            self.blocks += 1
            return
        self.out.write("\r" + (f"\x1b[{up}A" if up > 0 else "") + "\x1b[J")
        if self.blocks:
            self.out.write("\n")
        self.console.print(Markdown(block.strip("\n")))
        self.blocks += 1
        self.out.write(rest)
        self.out.flush()

    def finish(self) -> None:
        block, self.buffer = self.buffer, ""
        if block.strip():
            self._redraw(block, "")
