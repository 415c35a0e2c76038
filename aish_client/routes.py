"""Routing corrections from the way people use aish: a request that was routed (`aish "question"`)
and is then asked again of a named specialist (`aish apollo "question"`) tells the gateway where such
requests belong. The last routed request is kept in the data directory, so the rerun may be a new
aish process (the usual case) or the next line at the REPL prompt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from aish_client.oneshot import RERUN_WINDOW_S
from bus.client import Bus
from bus.discovery import normalise_request
from bus.errors import BusError


def _path(bus: Bus) -> Path:
    return bus.settings.data_dir / "last_route.json"


def remember(bus: Bus, text: str, chosen: str) -> None:
    """Note that ``text`` was routed to ``chosen`` (best effort: an unwritable data dir loses nothing)."""
    record = {"text": normalise_request(text), "chosen": chosen, "at": time.time()}
    try:
        path = _path(bus)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    except OSError:
        return


def _last(bus: Bus) -> dict[str, object] | None:
    try:
        record = json.loads(_path(bus).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


async def correct_if_rerun(bus: Bus, name: str, text: str) -> str | None:
    """If ``text`` is the request last routed elsewhere, tell the gateway it belongs to ``name``;
    returns the note to show, or None."""
    last = _last(bus)
    if not last or not text.strip() or last.get("text") != normalise_request(text):
        return None
    if last.get("chosen") == name or time.time() - float(str(last.get("at", 0))) > RERUN_WINDOW_S:
        return None
    try:
        await bus.gateway.discover(text=text, correct=name)
    except BusError:
        return None  # no gateway, or it refused: the request itself still runs
    remember(bus, text, name)  # one correction per rerun
    return f"noted: requests like this go to {name} from now on (routing had chosen {last.get('chosen')})"
