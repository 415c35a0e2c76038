"""NATS micro services that answer only where a client can read.

A request's reply subject is the asker's to choose, and the server lets a responder publish there (a
gateway may publish to ``$KV.>`` anyway: it writes the sessions bucket). Answered blindly, a ``$SRV.PING``
with a reply subject of ``$KV.<sessions>.s.<id>`` would be stored as someone's session. So every
service of ours answers ``$SRV`` pings, info and stats only to a subject ``bus.runs.answerable`` allows.
"""

from __future__ import annotations

from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.service import Service, ServiceConfig

from bus.logs import refused
from bus.runs import answerable

log = structlog.get_logger("tekton.micro")


class GuardedService(Service):
    def __init__(self, nc: NATS, config: ServiceConfig, prefix: str):
        super().__init__(nc, config)
        self.prefix = prefix

    def _answerable(self, msg: Msg) -> bool:
        if msg.reply and answerable(msg.reply, self.prefix):
            return True
        if msg.reply:  # (a ping without one wants no answer)
            refused.warning(
                log, "service request with a reply subject no client reads dropped", reply=msg.reply[:120]
            )
        return False

    async def _handle_ping_request(self, msg: Msg) -> None:
        if self._answerable(msg):
            await super()._handle_ping_request(msg)

    async def _handle_info_request(self, msg: Msg) -> None:
        if self._answerable(msg):
            await super()._handle_info_request(msg)

    async def _handle_stats_request(self, msg: Msg) -> None:
        if self._answerable(msg):
            await super()._handle_stats_request(msg)


async def add_service(nc: NATS, prefix: str, **config: Any) -> Service:
    """``nats.micro.add_service``, answering ``$SRV`` requests only where a client can read."""
    service = GuardedService(nc, ServiceConfig(**config), prefix)
    await service.start()
    return service
