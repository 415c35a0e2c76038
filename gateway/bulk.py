"""Bulk requests: validate the whole graph first, then run every operation as soon as its dependencies
are done, within a concurrency limit, streaming progress to the caller's inbox.

Partial success is a result: a failed operation skips only what depends on it.
"""

from __future__ import annotations

import difflib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from bus.bulk import (
    REF_RE,
    BulkDone,
    BulkHeartbeat,
    BulkOperation,
    BulkRequest,
    OpEnd,
    OpStart,
    OpStatus,
    OpSummary,
    encode_op_chunk,
    substitute,
)
from bus.client import Bus, ChatStream
from bus.errors import BadRequest, BusError
from bus.runs import parse_run_subject, probe_subject
from bus.subjects import ANONYMOUS, NAME_RE
from bus.wire import ChatMessage, ChatRequest, encode

log = structlog.get_logger("tekton.gateway.bulk")

# (session ref, specialist, request) -> (a stream to read, a coroutine storing (answer, status, error))
StoreAnswer = Callable[[str, str, str], Awaitable[Any]]
SessionTurn = Callable[[str, str, ChatRequest], Awaitable[tuple[ChatStream, StoreAnswer]]]


def dependencies(operations: list[BulkOperation]) -> dict[str, set[str]]:
    """Each operation's dependencies: ``depends_on`` plus every ``{id}`` its message refers to."""
    ids = {op.id for op in operations}
    graph: dict[str, set[str]] = {}
    for op in operations:  # a duplicated id (an error anyway) gets the union, so no cycle hides
        refs = {ref for ref in REF_RE.findall(op.message) if ref in ids and ref != op.id}
        graph.setdefault(op.id, set()).update(op.depends_on, refs)
    return graph


def validate(operations: list[BulkOperation], running: Iterable[str]) -> dict[str, set[str]]:
    """The dependency graph, or one BadRequest listing every problem found."""
    problems: list[str] = []
    if not operations:
        raise BadRequest("a bulk request needs at least one operation")
    counts = Counter(op.id for op in operations)
    problems += [f"operation id '{i}' is used {n} times" for i, n in counts.items() if n > 1]
    seen = set(counts)
    graph = dependencies(operations)
    for op in operations:
        missing = sorted(d for d in op.depends_on if d not in seen)
        if missing:
            problems.append(f"'{op.id}' depends on unknown operation(s): {', '.join(missing)}")
        if op.id in op.depends_on:
            problems.append(f"'{op.id}' depends on itself")
    live = set(running)
    unknown = sorted({op.ai for op in operations if not NAME_RE.match(op.ai) or op.ai not in live})
    if unknown:
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(live), n=1, cutoff=0.6)
            named.append(f"{name} (did you mean {close[0]}?)" if close else name)
        problems.append(
            f"no specialist running for: {', '.join(named)}"
            + (
                f"; running: {', '.join(sorted(live))}"
                if live
                else "; none is running (start them with `tekton up`)"
            )
        )
    cycle = _cycle({k: {d for d in v if d in seen and d != k} for k, v in graph.items()})
    if cycle:
        problems.append(f"dependency cycle: {' -> '.join(cycle)}")
    if problems:
        raise BadRequest("bulk request refused: " + "; ".join(problems))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One dependency cycle as a path (first id repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if state.get(start):
            continue
        path: list[str] = []
        stack: list[tuple[str, Any]] = [(start, iter(sorted(graph[start])))]
        state[start] = 1
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


class BulkRun:
    """One accepted bulk request, running."""

    def __init__(
        self,
        nc: NATS,
        bus: Bus,
        request: BulkRequest,
        graph: dict[str, set[str]],
        *,
        max_concurrency: int,
        heartbeat_s: float,
        session_turn: SessionTurn,
        owner: str = ANONYMOUS,
    ):
        self.nc = nc
        # Whose request: only their cancel subject (which the server pins to them) stops it.
        self.owner = owner
        self.bus = bus
        self.request = request
        self.graph = graph
        self.ops = {op.id: op for op in request.operations}
        limit = (
            1 if request.execution == "sequential" else min(max_concurrency, request.max_concurrency or 1024)
        )
        self.limiter = anyio.CapacityLimiter(limit)
        self.heartbeat_s = heartbeat_s
        self.session_turn = session_turn
        self.results: dict[str, OpSummary] = {}
        self.outputs: dict[str, str] = {}
        self.finished = {op_id: anyio.Event() for op_id in self.ops}
        self.seq = 0
        self.last_sent = time.monotonic()
        self.stop_reason: OpStatus = "cancelled"

    async def _emit(self, data: bytes) -> None:
        self.seq += 1
        self.last_sent = time.monotonic()
        await self.nc.publish(self.request.inbox, data)

    async def emit(self, model: type[OpStart | OpEnd | BulkHeartbeat | BulkDone], **fields: Any) -> None:
        await self._emit(encode(model(seq=self.seq, **fields)))

    async def run(self, cancelled: anyio.Event) -> None:
        """Run every operation; ``cancelled`` (the gateway's CancelBook) stops them."""
        started = time.perf_counter()
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._heartbeats)

            runner = anyio.CancelScope()

            def stop(reason: OpStatus) -> None:
                self.stop_reason = reason  # set before the cancel, so every stopped operation sees it
                runner.cancel()

            async def on_cancel() -> None:
                await cancelled.wait()
                stop("cancelled")

            async def deadline(seconds: float) -> None:
                await anyio.sleep(seconds)
                stop("timeout")

            if cancelled.is_set():  # cancelled before it began: no operation starts
                stop("cancelled")
            outer.start_soon(on_cancel)
            if parse_run_subject(self.request.inbox, self.bus.settings.prefix) is not None:
                outer.start_soon(self._followed, stop)
            if self.request.timeout_ms:
                outer.start_soon(deadline, self.request.timeout_ms / 1000)
            with runner:
                await self._run_all()
            # Whatever was stopped (cancel, whole-request timeout) is reported, never left blank.
            with anyio.CancelScope(shield=True):
                for op_id, op in self.ops.items():
                    if op_id not in self.results:
                        await self._end(op, self.stop_reason, f"the bulk request was {self._stopped()}")
                await self._done(started)
            outer.cancel_scope.cancel()

    def _stopped(self) -> str:
        return "cancelled" if self.stop_reason == "cancelled" else "out of time"

    async def _run_all(self) -> None:
        if self.request.execution == "sequential":
            for op_id in self._topological():
                await self._run_op(self.ops[op_id])
            return
        async with anyio.create_task_group() as tg:
            for op in self.ops.values():
                tg.start_soon(self._run_op, op)

    def _topological(self) -> list[str]:
        order: list[str] = []
        placed: set[str] = set()
        while len(order) < len(self.ops):
            for op_id in self.ops:  # request order among the ready ones
                if op_id not in placed and self.graph[op_id] <= placed:
                    order.append(op_id)
                    placed.add(op_id)
        return order

    async def _run_op(self, op: BulkOperation) -> None:
        try:
            for dep in sorted(self.graph[op.id]):
                await self.finished[dep].wait()
            failed = [d for d in sorted(self.graph[op.id]) if self.results[d].status != "ok"]
            if failed:
                await self._end(op, "skipped", f"skipped: {', '.join(failed)} did not succeed")
                return
            async with self.limiter:
                try:
                    await self._execute(op)
                except Exception as err:  # one operation's bug: it fails, the others and the run go on
                    log.exception("bulk operation crashed", op=op.id)
                    if op.id not in self.results:
                        await self._end(op, "failed", f"internal error ({type(err).__name__})")
        finally:
            self.finished[op.id].set()

    async def _execute(self, op: BulkOperation) -> None:
        message = substitute(op.message, self.outputs)
        deadline_ms = op.timeout_ms or self.request.op_timeout_ms
        deadline_s = deadline_ms / 1000 if deadline_ms else None
        for attempt in (1, 2):
            request = ChatRequest(
                messages=[ChatMessage(role="user", content=message)],
                options=op.options,
                timeout_ms=deadline_ms,
                model=op.model,
            )
            parts: list[str] = []
            began = time.perf_counter()
            first: float | None = None
            store: StoreAnswer | None = None
            status: OpStatus = "ok"
            error = ""
            tokens: int | None = None  # the done frame's count
            try:
                await self.emit(OpStart, op=op.id, specialist=op.ai, attempt=attempt)
                if op.session:
                    stream, store = await self.session_turn(op.session, op.ai, request)
                else:
                    stream = self.bus.stream(
                        op.ai,
                        request.messages,
                        op.options,
                        timeout=deadline_s,
                        request_id=request.id,
                        model=op.model,
                    )
                with anyio.move_on_after(deadline_s) as timer:
                    async with stream:
                        async for text in stream:
                            if first is None:
                                first = time.perf_counter()
                            parts.append(text)
                            await self._emit(encode_op_chunk(self.seq, op.id, text))
                        tokens = stream.tokens
                if timer.cancelled_caught:
                    status, error = "timeout", f"'{op.ai}' did not finish within {deadline_ms} ms"
            except BusError as err:
                if attempt == 1 and err.may_help_elsewhere and not parts:
                    log.info("retrying operation", op=op.id, error=err.message)
                    if store is not None:
                        with anyio.CancelScope(shield=True):
                            await store("", "error", err.message)
                    continue
                status, error = "failed", err.message
            except anyio.get_cancelled_exc_class():
                if store is not None:
                    with anyio.CancelScope(shield=True):
                        await store(
                            "".join(parts), self.stop_reason, f"the bulk request was {self._stopped()}"
                        )
                raise
            if store is not None:
                await store("".join(parts), status, error)
            self.outputs[op.id] = "".join(parts)
            total = time.perf_counter() - began
            await self._end(
                op,
                status,
                error,
                # An answer cut short has no done frame: at least a token a chunk.
                tokens=tokens if tokens is not None else len(parts),
                first_token_ms=round((first - began) * 1000, 3) if first else None,
                total_ms=round(total * 1000, 3),
            )
            return

    async def _end(self, op: BulkOperation, status: OpStatus, error: str = "", **figures: Any) -> None:
        result = OpSummary(op=op.id, specialist=op.ai, status=status, error=error or None, **figures)
        self.results[op.id] = result
        await self.emit(OpEnd, result=result)

    async def _done(self, started: float) -> None:
        results = [self.results[op_id] for op_id in self.ops]
        statuses = {r.status for r in results}
        if statuses == {"ok"}:
            overall = "ok"
        elif self.stop_reason in statuses and "ok" not in statuses:
            overall = self.stop_reason
        elif "ok" in statuses:
            overall = "partial"
        else:
            overall = "failed"
        await self.emit(
            BulkDone,
            status=overall,
            total_ms=round((time.perf_counter() - started) * 1000, 3),
            operations=results,
        )

    async def _followed(self, stop: Callable[[OpStatus], None]) -> None:
        """A bulk run that nobody follows (no subscriber on its run subject: its asker left and nobody
        attached) for ``run_resume_window_s`` stops, as a chat run does; a probe every heartbeat."""
        probe = probe_subject(self.request.inbox)
        window = self.bus.settings.run_resume_window_s
        unheard_since: float | None = None
        while True:
            await anyio.sleep(self.heartbeat_s)
            try:
                await self.nc.request(probe, b"", timeout=min(0.5, self.heartbeat_s))
                heard = True  # (listeners do not answer probes: silence is the usual "yes")
            except nats.errors.NoRespondersError:
                heard = False
            except (nats.errors.TimeoutError, nats.errors.Error, OSError):
                heard = True  # silence, or no connection to ask over: assume someone follows
            now = time.monotonic()
            if heard:
                unheard_since = None
            elif unheard_since is None:
                unheard_since = now
            if unheard_since is not None and now - unheard_since >= window:
                log.info("nobody followed the bulk run for its resume window", id=self.request.id)
                stop("cancelled")
                return

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_s / 2)
            if time.monotonic() - self.last_sent >= self.heartbeat_s:
                await self.emit(BulkHeartbeat)
