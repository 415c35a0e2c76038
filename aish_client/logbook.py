"""Every prompt and answer aish saw, in SQLite in the data dir (``logs.db``): `aish logs` reads it.

One row per answered stage (or per failed or interrupted one, with what arrived before it stopped), with
the specialist, provider and model, token counts and timings. Turned off with ``--no-log``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.bulk import BulkOperation, OpSummary
    from bus.client import ChatStream, StreamResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    specialist TEXT NOT NULL,
    provider TEXT,
    model TEXT,
    session TEXT,
    request_id TEXT,
    system TEXT,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    finish_reason TEXT,
    tokens_in INTEGER,
    tokens_out INTEGER,
    first_token_ms REAL,
    total_ms REAL,
    tokens_per_s REAL
);
CREATE INDEX IF NOT EXISTS answers_at ON answers (at);
"""
COLUMNS = [
    "id",
    "at",
    "specialist",
    "provider",
    "model",
    "session",
    "request_id",
    "system",
    "prompt",
    "answer",
    "status",
    "error",
    "finish_reason",
    "tokens_in",
    "tokens_out",
    "first_token_ms",
    "total_ms",
    "tokens_per_s",
]


class Logbook:
    def __init__(self, path: Path):
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5)
        db.executescript(SCHEMA)
        return db

    def _insert(self, row: dict[str, Any]) -> None:
        row = {"at": time.time(), **row}
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        try:
            with closing(self._connect()) as db, db:
                db.execute(f"INSERT INTO answers ({names}) VALUES ({marks})", tuple(row.values()))
        except (sqlite3.Error, UnicodeEncodeError):  # (text from bytes that are not UTF-8) a log that
            return  # cannot be written never costs the user the answer

    def record(
        self,
        specialist: str,
        prompt: str,
        system: str | None,
        result: StreamResult,
        session: str | None,
        request_id: str,
        first_token_ms: float | None,
    ) -> None:
        done = result.done
        self._insert(
            {
                "specialist": specialist,
                "provider": result.start.provider,
                "model": result.start.model,
                "session": session,
                "request_id": request_id,
                "system": system,
                "prompt": prompt,
                "answer": result.text,
                "status": "ok",
                "finish_reason": done.finish_reason,
                "tokens_in": done.usage.prompt_tokens,
                "tokens_out": done.usage.completion_tokens,
                "first_token_ms": round(first_token_ms, 1) if first_token_ms is not None else None,
                "total_ms": done.timings.total_ms,
                "tokens_per_s": done.timings.tokens_per_s,
            }
        )

    def record_failure(
        self,
        specialist: str,
        model: str | None,
        prompt: str,
        system: str | None,
        stream: ChatStream,
        session: str | None,
        err: BaseException,
    ) -> None:
        start = stream.start_frame
        partial = stream.text_so_far
        self._insert(
            {
                "specialist": specialist,
                "provider": start.provider if start else None,
                "model": start.model if start else model,
                "session": session,
                "request_id": stream.request.id,
                "system": system,
                "prompt": prompt,
                "answer": partial,
                "status": "error" if isinstance(err, Exception) else "interrupted",
                "error": str(err) or type(err).__name__,
                "tokens_out": None,
            }
        )

    def record_operation(
        self, bulk_id: str, op: BulkOperation, prompt: str, answer: str, summary: OpSummary
    ) -> None:
        """One operation of a fan-out or `aish bulk` (the gateway reports no provider or prompt tokens
        for them; its status is the operation's: ok, failed, timeout, cancelled)."""
        total_ms = summary.total_ms
        first_ms = summary.first_token_ms
        generating_s = (total_ms - first_ms) / 1000 if total_ms is not None and first_ms is not None else 0
        self._insert(
            {
                "specialist": summary.specialist,
                "model": op.model,
                "session": op.session,
                "request_id": f"{bulk_id}/{op.id}",
                "prompt": prompt,
                "answer": answer,
                "status": summary.status,
                "error": summary.error,
                "tokens_out": summary.tokens,
                "first_token_ms": round(first_ms, 1) if first_ms is not None else None,
                "total_ms": total_ms,
                "tokens_per_s": round(summary.tokens / generating_s, 1) if generating_s > 0 else None,
            }
        )

    def entries(self, limit: int = 10, query: str | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` entries (oldest first), those whose prompt or answer holds ``query``."""
        if not self.path.exists():
            return []
        where, params = "", []
        if query:
            where = (
                "WHERE prompt LIKE ? ESCAPE '\\' OR answer LIKE ? ESCAPE '\\' OR system LIKE ? ESCAPE '\\'"
            )
            like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            params = [like, like, like]
        with closing(self._connect()) as db:
            rows = db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM answers {where} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
        return [dict(zip(COLUMNS, row, strict=True)) for row in reversed(rows)]


def open_logbook(data_dir: Path, off: bool = False) -> Logbook | None:
    """The data dir's logbook, or None with --no-log."""
    return None if off else Logbook(data_dir / "logs.db")


def as_text(entry: dict[str, Any]) -> Iterator[str]:
    """One entry for a person: a header line, the prompt quoted, the answer."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["at"]))
    model = f"{entry['provider']}:{entry['model']}" if entry["provider"] else (entry["model"] or "?")
    tokens = f"{entry['tokens_in'] if entry['tokens_in'] is not None else '?'} in / {entry['tokens_out']} out"
    status = "" if entry["status"] == "ok" else f" [{entry['status']}: {entry['error']}]"
    if entry["finish_reason"] == "length":
        status += " [stopped at max tokens]"
    yield f"## {when}  #{entry['id']}  {entry['specialist']}  {model}  {tokens}{status}"
    if entry["session"]:
        yield f"session {entry['session']}"
    if entry["system"]:
        yield f"system: {entry['system']}"
    yield from ("> " + line for line in entry["prompt"].splitlines() or [""])
    yield ""
    yield entry["answer"]
    yield ""


def as_json(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False)
