"""One specialist replica on the bus: a NATS micro service whose ``chat`` endpoint streams answers.

The micro handler only decodes the request and hands it to its own task, so one slow answer never
blocks the next request. That also means micro's own ``processing_time`` measures dispatch only; the
real figures (served, errors, cancelled, in flight, average total and first-token ms) are in the
endpoint's ``data`` in ``$SRV.STATS``.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from bus.errors import BusError, DeadlineExceeded, ErrorCode
from bus.settings import TektonSettings
from bus.subjects import cancel_wildcard, chat_subject, queue_group
from bus.wire import (
    ChatMessage,
    ChatOptions,
    ChatRequest,
    ErrorFrame,
    HeartbeatFrame,
    StartFrame,
    decode_request,
    encode,
    encode_chunk,
    encode_done,
)
from specialists.providers.base import Provider
from specialists.roster import SpecialistSpec

log = structlog.get_logger("tekton.specialist")

VERSION = "0.1.0"
# A stream yields the event loop after this long of producing without a pause: often enough that
# other requests and cancels wait at most a few ms, rarely enough that its frames still leave in
# large writes (a yield per few chunks costs a socket write each and halves a fast stream).
SLICE_S = 0.002


class ReplyStream:
    """Frames of one answer, published to the request's reply subject with consecutive ``seq``."""

    def __init__(self, nc: NATS, subject: str):
        self.nc = nc
        self.subject = subject
        self.seq = 0
        self.last_sent = time.monotonic()

    async def _publish(self, data: bytes) -> None:
        self.seq += 1
        self.last_sent = time.monotonic()
        await self.nc.publish(self.subject, data)

    async def send_encoded(self, data: bytes) -> None:
        await self._publish(data)

    async def send(self, frame_type: type[Any], **fields: Any) -> None:
        await self._publish(encode(frame_type(seq=self.seq, **fields)))

    async def chunk(self, text: str) -> None:
        await self._publish(encode_chunk(self.seq, text))

    async def error(self, err: BusError) -> None:
        await self.send(ErrorFrame, code=str(err.code), message=err.message, retryable=err.retryable)


@dataclass
class ServiceCounters:
    served: int = 0
    errors: int = 0
    cancelled: int = 0
    in_flight: int = 0
    total_ms: float = 0.0
    first_token_ms: float = 0.0
    first_tokens: int = 0

    def as_data(self) -> dict[str, Any]:
        data: dict[str, Any] = asdict(self)
        data["avg_ms"] = round(self.total_ms / self.served, 3) if self.served else None
        data["avg_first_token_ms"] = (
            round(self.first_token_ms / self.first_tokens, 3) if self.first_tokens else None
        )
        return data


class SpecialistService:
    def __init__(
        self,
        nc: NATS,
        spec: SpecialistSpec,
        provider: Provider,
        settings: TektonSettings,
        task_group: TaskGroup,
    ):
        self.nc = nc
        self.spec = spec
        self.provider = provider
        self.settings = settings
        self._tg = task_group
        self._limiter = anyio.CapacityLimiter(settings.max_concurrency)
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._streaming: dict[str, ReplyStream] = {}
        self._idle = anyio.Event()
        self._idle.set()
        self._draining = False
        self.counters = ServiceCounters()
        self._service: Service | None = None
        self._cancel_sub: Any = None
        self.log = log.bind(specialist=spec.name)
        # Per-request work kept off the hot path: the persona message, the roster's default options
        # and the start frame (always seq 0, the same for every answer) are built once.
        self._system = ChatMessage(role="system", content=spec.system_prompt)
        self._defaults = spec.options.model_dump(exclude_none=True)
        self._start_frame = b""

    @property
    def instance_id(self) -> str:
        return self._service.id if self._service else ""

    async def start(self) -> None:
        self._cancel_sub = await self.nc.subscribe(cancel_wildcard(self.settings.prefix), cb=self._on_cancel)
        self._service = await add_service(
            self.nc,
            name=self.spec.name,
            version=VERSION,
            description=self.spec.description,
            metadata={
                **self.spec.micro_metadata(self.provider.name, self.provider.model),
                "max_concurrency": str(self.settings.max_concurrency),
            },
            stats_handler=self._stats_data,
        )
        await self._service.add_endpoint(
            name="chat",
            subject=chat_subject(self.spec.name, self.settings.prefix),
            queue_group=queue_group(self.spec.name, self.settings.prefix),
            handler=self._on_chat,
        )
        self._start_frame = encode(
            StartFrame(
                specialist=self.spec.name,
                instance=self.instance_id,
                provider=self.provider.name,
                model=self.provider.model,
            )
        )
        self._tg.start_soon(self._heartbeats)
        await self.nc.flush()
        self.log.info("specialist ready", instance=self.instance_id, provider=self.provider.name)

    def _stats_data(self, _endpoint: EndpointStats) -> dict[str, Any]:
        return self.counters.as_data()

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        scope = self._scopes.get(request_id)
        if scope is not None:
            self.log.info("cancel received", request_id=request_id)
            scope.cancel()

    async def _on_chat(self, req: Request) -> None:
        reply_to = req._msg.reply  # micro exposes no public accessor for the reply subject
        if not reply_to:
            self.log.warning("chat request without a reply subject dropped")
            return
        reply = ReplyStream(self.nc, reply_to)
        if self._draining:
            await reply.error(
                BusError("this replica is shutting down", code=ErrorCode.SHUTTING_DOWN, retryable=True)
            )
            return
        try:
            request = decode_request(req.data)
        except BusError as err:
            self.counters.errors += 1
            self.log.warning("bad request", error=err.message)
            await reply.error(err)
            return
        self.counters.in_flight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._tg.start_soon(self._serve, request, reply)

    def _prompt(self, request: ChatRequest) -> tuple[list[ChatMessage], ChatOptions]:
        given = request.options.model_dump(exclude_none=True)
        # Both sides are validated ChatOptions already: merging them needs no second validation.
        return [self._system, *request.messages], ChatOptions.model_construct(**{**self._defaults, **given})

    async def _serve(self, request: ChatRequest, reply: ReplyStream) -> None:
        log = self.log.bind(request_id=request.id)
        received = time.perf_counter()
        first_token: float | None = None
        slice_start = 0.0
        tokens = 0
        messages, options = self._prompt(request)
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self.settings.request_timeout_s
        scope = anyio.CancelScope()
        self._scopes[request.id] = scope
        try:
            with scope:
                await reply.send_encoded(self._start_frame)
                self._streaming[request.id] = reply  # the heartbeat ticker watches it from now on
                try:
                    with anyio.fail_after(timeout):
                        # aclosing: a stopped answer releases the provider (its model) now, not
                        # whenever the abandoned generator is collected.
                        async with (
                            self._limiter,
                            aclosing(self.provider.stream(messages, options)) as texts,  # type: ignore[type-var]
                        ):
                            async for text in texts:
                                await reply.chunk(text)
                                tokens += 1
                                if first_token is None:
                                    first_token = time.perf_counter()
                                    # Let the first token leave now instead of with the next batch.
                                    await anyio.lowlevel.checkpoint()
                                    slice_start = reply.last_sent
                                elif reply.last_sent - slice_start >= SLICE_S:
                                    # A provider producing flat out never suspends (a publish only
                                    # buffers), so nothing else in this process would run: not
                                    # other requests, not the read loop that brings its cancel.
                                    slice_start = reply.last_sent
                                    await anyio.lowlevel.checkpoint()
                finally:
                    self._streaming.pop(request.id, None)
                total = time.perf_counter() - received
                gen = total - (first_token - received) if first_token else 0.0
                await reply.send_encoded(
                    encode_done(
                        reply.seq,
                        "length" if options.max_tokens and tokens >= options.max_tokens else "stop",
                        completion_tokens=tokens,
                        total_ms=round(total * 1000, 3),
                        first_token_ms=round((first_token - received) * 1000, 3) if first_token else None,
                        tokens_per_s=round((tokens - 1) / gen, 2) if tokens > 1 and gen > 0 else None,
                    )
                )
                self.counters.served += 1
                self.counters.total_ms += total * 1000
                if first_token:
                    self.counters.first_tokens += 1
                    self.counters.first_token_ms += (first_token - received) * 1000
                log.debug("served", tokens=tokens, total_ms=round(total * 1000, 1))
            if scope.cancelled_caught:
                self.counters.cancelled += 1
                log.info("generation stopped", tokens=tokens, draining=self._draining)
                # The asker has stopped listening, but an observer (the gateway recording a session)
                # has not: the stream still ends with one closing frame.
                if self._draining:
                    await reply.error(
                        BusError(
                            "the replica shut down mid-answer", code=ErrorCode.SHUTTING_DOWN, retryable=True
                        )
                    )
                else:
                    await reply.error(BusError("cancelled by the client", code=ErrorCode.CANCELLED))
        except TimeoutError:
            self.counters.errors += 1
            await reply.error(
                DeadlineExceeded(f"'{self.spec.name}' did not finish within its {timeout:g} s deadline")
            )
        except BusError as err:
            self.counters.errors += 1
            log.warning("request failed", code=str(err.code), error=err.message)
            await reply.error(err)
        except Exception as err:
            self.counters.errors += 1
            log.exception("request crashed")
            await reply.error(BusError(f"'{self.spec.name}' failed: {type(err).__name__}: {err}"))
        finally:
            self._scopes.pop(request.id, None)
            self.counters.in_flight -= 1
            if self.counters.in_flight == 0:
                self._idle.set()

    async def _heartbeats(self) -> None:
        """One ticker per service: a stream silent for ``heartbeat_s`` (model thinking, or waiting for a
        free slot) gets a heartbeat, so the client can tell "slow" from "dead"."""
        interval = self.settings.heartbeat_s
        while True:
            await anyio.sleep(interval / 2)
            now = time.monotonic()
            for reply in list(self._streaming.values()):
                if now - reply.last_sent >= interval:
                    await reply.send(HeartbeatFrame)

    async def drain(self, grace: float) -> None:
        """Take no new requests; let in-flight streams finish for up to ``grace`` seconds, then stop them."""
        self._draining = True
        if self._service is not None:
            await self._service.stop()
        with anyio.move_on_after(grace):
            await self._idle.wait()
        for scope in list(self._scopes.values()):
            scope.cancel()
        if self._cancel_sub is not None:
            await self._cancel_sub.unsubscribe()
        await self.provider.aclose()
        self.log.info("specialist stopped", served=self.counters.served)
