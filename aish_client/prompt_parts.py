"""What goes into a request besides the question: ``-o key=value`` options and ``-f/--attach`` files."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from bus.wire import MODEL_RE, ChatOptions

# One attached file, and all of them together: well under NATS's 1 MB max_payload, which the whole
# request (history included) must fit in.
MAX_FILE_BYTES = 256 * 1024
MAX_TOTAL_BYTES = 512 * 1024


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit 2."""


def option_names() -> list[str]:
    return sorted(ChatOptions.model_fields)


def chat_options(pairs: Sequence[str], **given: object) -> ChatOptions:
    """``-o key=value`` pairs on top of the named options (``--max-tokens``...), validated."""
    values = {k: v for k, v in given.items() if v is not None}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"-o takes key=value, got {pair!r} (keys: {', '.join(option_names())})")
        if key not in ChatOptions.model_fields:
            raise UsageError(f"-o {key}: no such option (keys: {', '.join(option_names())})")
        values[key] = value.strip()
    try:
        return ChatOptions.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"-o {where}={values.get(where)!s}: {first['msg']}") from None


def check_model(model: str | None) -> str | None:
    if model is not None and not MODEL_RE.match(model):
        raise UsageError(f"-m {model!r}: not a model name (PROVIDER:MODEL, e.g. ollama:qwen2.5:7b)")
    return model


def attachments(patterns: Sequence[str]) -> str | None:
    """The text of every file the patterns name (globs expanded, ``~`` too), each under a header line;
    None when there are none. Refuses missing files, binary files and too much text, saying which."""
    if not patterns:
        return None
    files: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        if not matches:
            raise UsageError(f"-f {pattern}: no file matches")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                if glob.has_magic(expanded):
                    continue
                raise UsageError(f"-f {pattern}: is a directory (use a glob: {pattern}/*.py)")
            if not path.is_file():
                raise UsageError(f"-f {pattern}: no such file")
            if path not in files:
                files.append(path)
    parts, total = [], 0
    for path in files:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UsageError(f"-f {path}: {size} bytes, over the {MAX_FILE_BYTES // 1024} KiB limit per file")
        total += size
        if total > MAX_TOTAL_BYTES:
            raise UsageError(f"-f: the files add up to over {MAX_TOTAL_BYTES // 1024} KiB (at {path})")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"-f {path}: not UTF-8 text (binary files cannot be attached)") from None
        except OSError as err:
            raise UsageError(f"-f {path}: {err.strerror}") from None
        parts.append(f"--- {path} ---\n{text.rstrip()}\n--- end of {path} ---")
    return "\n\n".join(parts) if parts else None
