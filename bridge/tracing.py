"""W3C trace context from HTTP callers: a request with a ``traceparent`` header is served inside a
span continuing that trace, so the bus requests it makes (and the specialists') join it. Off and
free when tracing is off: one check per request."""

from __future__ import annotations

from typing import Any

from bus import tracing


class TraceContext:
    """ASGI middleware (HTTP and WebSocket)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or not tracing.enabled():
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if sum(k.lower() == b"traceparent" for k, _ in scope["headers"]) > 1:
            del headers["traceparent"]  # two are none (W3C trace context): a trace of its own
        name = f"{scope.get('method', 'WS')} {scope.get('path', '')}"
        trace = tracing.admit(headers, name)
        if trace is None:  # (its sampler failed on it)
            return await self.app(scope, receive, send)
        with tracing.current(name, "server", trace, {"http.target": scope.get("path", "")}) as span:
            if span is None:  # (sampled out)
                return await self.app(scope, receive, send)

            async def send_noting_status(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:  # a server span fails on 5xx only: a 4xx is the caller's
                        tracing.fail(span, f"HTTP {status}")
                await send(message)

            return await self.app(scope, receive, send_noting_status)
