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
        name = f"{scope.get('method', 'WS')} {scope.get('path', '')}"
        trace = tracing.admit(headers, name)
        if trace is None:  # (its sampler failed on it)
            return await self.app(scope, receive, send)
        with tracing.current(name, "server", trace, {"http.target": scope.get("path", "")}):
            return await self.app(scope, receive, send)
