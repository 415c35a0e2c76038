"""Pipelines with fan-out (`apollo,athena << "msg"`, `{apollo|athena} | prometheus`) and `aish bulk FILE`:
turned into one bulk request that the gateway runs as a dependency graph, shown as it streams.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from pydantic import ValidationError

from aish_client.logbook import Logbook
from aish_client.parser import Pipeline, Target
from aish_client.render import Renderer
from bus.bulk import (
    OP_ID_MAX,
    BulkDone,
    BulkEvent,
    BulkOperation,
    BulkPlan,
    BulkStream,
    OpChunk,
    OpEnd,
    OpStart,
    OpStatus,
    OpSummary,
    substitute,
)
from bus.client import Bus
from bus.errors import BusError, InvalidInput, problems_line
from bus.wire import ChatOptions

Layout = Literal["stacked", "lines"]


def plan_pipeline(
    pipeline: Pipeline,
    text: str | None,
    options: ChatOptions | None,
    session: str | None,
    chosen: dict[Target, str] | None = None,
    model: str | None = None,
) -> tuple[BulkPlan, list[str]]:
    """The bulk plan of ``pipeline`` and the ids of its last stage's operations (the ones shown).

    Every stage depends on the whole previous stage; a group's answers reach the next stage labelled.
    ``chosen`` names the specialist picked for each ``@capability`` target.
    """
    chosen = chosen or {}
    names = Counter(chosen.get(t, t.name) for stage in pipeline.stages for t in stage.targets)
    operations: list[BulkOperation] = []
    previous: list[tuple[str, str]] = []  # (op id, specialist) of the stage before
    taken: set[str] = set()
    for number, stage in enumerate(pipeline.stages, start=1):
        missing = [t for t in stage.targets if t.capability and t not in chosen]
        if missing:
            raise BusError(f"column {missing[0].column}: no specialist chosen for {missing[0]}")
        if previous:
            if len(previous) == 1:
                given = "{" + previous[0][0] + "}"
            else:
                twice = Counter(name for _, name in previous)  # two samples of one: labelled by op id
                given = "\n\n".join(
                    f"[{name if twice[name] == 1 else op}]\n{{{op}}}" for op, name in previous
                )
        else:
            given = text or ""
        message = "\n\n".join(p for p in (stage.message, given) if p)
        if not message.strip():
            raise BusError(
                f'column {stage.column}: nothing to send: give the stage a message (<< "..."), pipe text '
                "in, or use echo"
            )
        current: list[tuple[str, str]] = []
        in_stage = Counter(chosen.get(t, t.name) for t in stage.targets)
        for target in stage.targets:
            name = chosen.get(target, target.name)
            suffix = "" if names[name] == 1 else f"-{number}"
            if in_stage[name] > 1:  # the same specialist twice in a stage (two samples): apollo-1.2
                suffix += f".{sum(1 for _, n in current if n == name) + 1}"
            op_id = _op_id(name, suffix)
            while op_id in taken:  # a specialist whose name looks like another's id (apollo-1)
                suffix += "_"
                op_id = _op_id(name, suffix)
            taken.add(op_id)
            operations.append(
                BulkOperation(
                    id=op_id,
                    ai=name,
                    message=message,
                    depends_on=[op for op, _ in previous],
                    session=session,
                    options=options or ChatOptions(),
                    model=stage.model or model,
                )
            )
            current.append((op_id, name))
        previous = current
    return BulkPlan(operations=operations), [op for op, _ in previous]


def _op_id(name: str, suffix: str) -> str:
    """``name`` and ``suffix``, the name cut so the id fits an operation id's 64 characters (a name
    may have 64 of its own)."""
    return name[: OP_ID_MAX - len(suffix)] + suffix


# A plan is a page of YAML; a file far larger is not one (and is not read whole into memory: a pipe,
# `aish bulk <(envsubst < plan.yaml)`, is read as it comes, /dev/zero stops here).
PLAN_MAX_BYTES = 4 * 1024 * 1024


def load_plan(path: str) -> BulkPlan:
    """A bulk plan from a YAML or JSON file (the bulk request's fields, see docs/protocol.md)."""
    file = Path(path).expanduser()
    kind = "JSON" if file.suffix.lower() == ".json" else "YAML"
    try:
        if file.is_dir():
            raise InvalidInput(f"{file} is a directory, not a bulk plan")
        with file.open("rb") as handle:
            data = handle.read(PLAN_MAX_BYTES + 1)
    except OSError as err:
        raise BusError(f"cannot read {file}: {err.strerror}") from err
    if len(data) > PLAN_MAX_BYTES:
        raise InvalidInput(f"{file} is over {PLAN_MAX_BYTES // 1024 // 1024} MiB: not a bulk plan")
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{file} is not UTF-8 text") from None
    try:
        if kind == "JSON":
            parsed = json.loads(raw)
        else:
            import yaml

            parsed = yaml.safe_load(raw)
    except Exception as err:  # ValueError, yaml.YAMLError and friends
        raise InvalidInput(f"{file} is not valid {kind}: {_one_line(err)}") from None
    try:
        return BulkPlan.model_validate(parsed)
    except ValidationError as err:
        raise InvalidInput(f"{file}: {problems_line(err, 'the plan')}"[:400]) from None


def _one_line(err: Exception) -> str:
    """A parser's error in one line: YAML's problem and where, not its quoted excerpt of the file."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())[:200]


@dataclass
class FanoutView:
    """Shows the streams of the operations in ``shown`` (the rest only as progress on stderr).

    ``stacked``: one after another, each under a header; the first streams live, the others are
    buffered until it is their turn (then live again). ``lines``: side by side as labelled lines, each
    line printed when complete (``apollo │ ...``), as `docker compose logs` does.
    """

    renderer: Renderer
    shown: list[str]
    specialists: dict[str, str]
    layout: Layout = "stacked"
    out: TextIO | None = None
    _buffers: dict[str, list[str]] = field(default_factory=dict)
    _ended: set[str] = field(default_factory=set)
    _live: int = 0
    _tokens: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._buffers = {op: [] for op in self.shown}
        self._width = max((len(op) for op in self.shown), default=0)
        if self.layout == "stacked" and self.shown:
            self._header(self.shown[0])

    def _write(self, text: str) -> None:
        if self.out is not None:
            self.out.write(text)
        else:
            self.renderer.token(text)

    def _header(self, op: str) -> None:
        if len(self.shown) > 1:
            if self._live:
                self.end_line()
            self._write(f"── {op} ──\n")

    def show(self, op: str) -> None:
        """Show ``op`` too (attaching to a bulk run, whose operations are learnt as they start)."""
        if op not in self._buffers:
            self.shown.append(op)
            self._buffers[op] = []
            self._width = max(self._width, len(op))

    def end_line(self) -> None:
        if self.out is None:
            self.renderer.end_answer()

    def event(self, event: object) -> None:
        if isinstance(event, OpChunk):
            self._chunk(event.op, event.text)
        elif isinstance(event, OpStart):
            if event.op not in self._buffers:
                self.renderer.progress(event.op, 0)
        elif isinstance(event, OpEnd):
            self._end(event)

    def _chunk(self, op: str, text: str) -> None:
        if op not in self._buffers:
            self._tokens[op] += 1
            self.renderer.progress(op, self._tokens[op])
            return
        if self.layout == "lines":
            self._buffers[op].append(text)
            joined = "".join(self._buffers[op])
            *complete, rest = joined.split("\n")
            for line in complete:
                self._write(f"{op:<{self._width}} │ {line}\n")
            self._buffers[op] = [rest] if rest else []
        elif self.shown[self._live] == op:
            self._write(text)
        else:
            self._buffers[op].append(text)

    def _end(self, event: OpEnd) -> None:
        result = event.result
        if result.status != "ok":
            self.renderer.error(f"{result.op} ({result.specialist}) {result.status}: {result.error}")
        if result.op not in self._buffers:
            self.renderer.progress(result.op, self._tokens[result.op], done=True)
            self.renderer.clear_progress()
            return
        self._ended.add(result.op)
        if self.layout == "lines":
            rest = "".join(self._buffers[result.op])
            if rest:
                self._write(f"{result.op:<{self._width}} │ {rest}\n")
            self._buffers[result.op] = []
            return
        # Stacked: move on through every shown operation that has already ended.
        while self._live < len(self.shown) and self.shown[self._live] in self._ended:
            self._live += 1
            if self._live < len(self.shown):
                nxt = self.shown[self._live]
                self._header(nxt)
                self._write("".join(self._buffers[nxt]))
                self._buffers[nxt] = []

    def finish(self, done: BulkDone) -> None:
        self.end_line()
        counts = Counter(r.status for r in done.operations)
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        if len(done.operations) > 1:
            self.renderer.note(f"{summary} in {done.total_ms / 1000:.2f} s")


async def run_plan(
    bus: Bus,
    plan: BulkPlan,
    shown: list[str],
    renderer: Renderer,
    *,
    layout: Layout = "stacked",
    out: TextIO | None = None,
    logbook: Logbook | None = None,
) -> BulkDone:
    """Run ``plan`` through the gateway and show it (as --json events when the renderer takes them);
    ``logbook`` records each operation that ran. Raises if any operation did not succeed."""
    async with bus.bulk(plan) as bulk:
        bulk.on_resume = lambda seq: renderer.note(
            f"(the connection dropped events; the bulk run goes on from event {seq})"
        )
        specialists = {op.id: op.ai for op in plan.operations}
        view = None if renderer.json_events else FanoutView(renderer, shown, specialists, layout, out)
        record = _Records(plan, bulk, logbook)
        try:
            async for event in bulk:
                if view is not None:
                    view.event(event)
                else:
                    json_event(renderer, event)
                if isinstance(event, OpStart):
                    record.started.add(event.op)
                elif isinstance(event, OpEnd):
                    record.ended(event.result)
        except BaseException as err:  # Ctrl-C too: what the running operations said so far is kept
            record.unfinished(err)
            raise
    return _finished(bulk.done, view)


async def attach_bulk(bus: Bus, run_id: str, after: int, renderer: Renderer) -> BulkDone | None:
    """Follow a bulk run from the runs stream (``aish attach``): each operation's output as labelled
    lines, the events after ``after`` then live; raises as ``run_plan`` does if an operation failed.
    None when the run ended at or before ``after`` (nothing to show)."""
    async with bus.attach_bulk(run_id, after=after) as bulk:
        if bulk.nothing_after:
            renderer.note(f"run {run_id} ended at event {bulk.ended_at}: nothing after event {after}")
            return None
        view = FanoutView(renderer, [], {}, "lines")
        async for event in bulk:
            if isinstance(event, OpStart | OpChunk):
                view.show(event.op)
            view.event(event)
    return _finished(bulk.done, view)


def _finished(done: BulkDone | None, view: FanoutView | None) -> BulkDone:
    """Show the summary (not with --json events); raise if any operation did not succeed."""
    assert done is not None
    if view is not None:
        view.finish(done)
    if done.status != "ok":
        failed = [r.op for r in done.operations if r.status != "ok"]
        raise BusError(
            f"{len(failed)} of {len(done.operations)} operations did not succeed: {', '.join(failed)}"
        )
    return done


def json_event(renderer: Renderer, event: BulkEvent) -> None:
    """A bulk event as a --json event (docs/aish-json.md); heartbeats are not shown."""
    if isinstance(event, OpStart):
        renderer.event("op_start", op=event.op, specialist=event.specialist, attempt=event.attempt)
    elif isinstance(event, OpChunk):
        renderer.event("op_chunk", op=event.op, text=event.text)
    elif isinstance(event, OpEnd):
        renderer.event("op_end", **event.result.model_dump())
    elif isinstance(event, BulkDone):
        operations = [r.model_dump() for r in event.operations]
        renderer.event("bulk_done", status=event.status, total_ms=event.total_ms, operations=operations)


class _Records:
    """Writes each operation of a bulk request to the logbook as it ends (or is left unfinished)."""

    def __init__(self, plan: BulkPlan, bulk: BulkStream, logbook: Logbook | None):
        self.operations = {op.id: op for op in plan.operations}
        self.bulk, self.logbook = bulk, logbook
        self.started: set[str] = set()

    def ended(self, summary: OpSummary) -> None:
        self.started.discard(summary.op)
        if self.logbook is None or summary.status == "skipped":  # never asked: nothing to record
            return
        op = self.operations[summary.op]
        outputs = {name: self.bulk.output(name) for name in self.operations}
        self.logbook.record_operation(
            self.bulk.id, op, substitute(op.message, outputs), self.bulk.output(op.id), summary
        )

    def unfinished(self, err: BaseException) -> None:
        """The operations still running when the request stopped on our side, with what they said."""
        status: OpStatus = "failed" if isinstance(err, Exception) else "cancelled"
        for name in sorted(self.started):
            error = str(err) or type(err).__name__
            self.ended(OpSummary(op=name, specialist=self.operations[name].ai, status=status, error=error))
