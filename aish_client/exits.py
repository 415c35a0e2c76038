"""aish's exit codes, and the one place that turns an error into its line and its code."""

from __future__ import annotations

import sys

from aish_client.parser import PipelineSyntaxError
from aish_client.prompt_parts import UsageError
from aish_client.render import Renderer, silence_stdout
from bus.argparsing import EXIT_USAGE
from bus.errors import BusError, InvalidInput

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

# What a command may end with that is the user's to read, not a traceback.
HANDLED = (PipelineSyntaxError, UsageError, BusError, KeyboardInterrupt, OSError)


def exit_code_for(err: BaseException, renderer: Renderer) -> int:
    """Say ``err`` in one line on stderr and return aish's exit code for it (one of :data:`HANDLED`):
    2 for a usage error, 1 for a failure, 130 when interrupted, 0 when the reader went away."""
    if isinstance(err, PipelineSyntaxError):
        renderer.error(err.one_line())
        return EXIT_USAGE
    if isinstance(err, UsageError):
        renderer.error(str(err))
        return EXIT_USAGE
    if isinstance(err, BusError):
        renderer.end_answer()
        renderer.error(str(err))
        # A request found invalid before it was sent (a session name with a space) is the asker's.
        return EXIT_USAGE if isinstance(err, InvalidInput) else EXIT_ERROR
    if isinstance(err, KeyboardInterrupt):
        renderer.end_answer()
        renderer.error("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(err, BrokenPipeError):
        # The reader went away (`aish list | head`): stop quietly, like other Unix tools.
        sys.stderr.close()
        return 0
    if isinstance(err, OSError):  # stdout on a full disk (`> /dev/full`), an I/O error...
        silence_stdout()
        renderer.error(f"cannot write the answer: {err.strerror or err}")
        return EXIT_ERROR
    raise err


def json_error(renderer: Renderer, err: BusError) -> None:
    """With --json, a failure is the last event on stdout too (docs/aish-json.md)."""
    if renderer.json_events:
        renderer.event("error", code=str(err.code), message=str(err), retryable=err.retryable)
