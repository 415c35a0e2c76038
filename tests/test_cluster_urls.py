"""Every process takes a list of NATS servers (comma-separated) and uses whichever answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.client import Bus, connect
from bus.cluster import free_ports, session_replicas, split_urls
from bus.errors import BusError, NatsUnavailable
from bus.settings import TektonSettings
from tests.helpers import in_process_specialists, run_aish

pytestmark = [pytest.mark.fast, pytest.mark.anyio]


def test_split_urls() -> None:
    assert split_urls(" nats://a:4222, nats://b:4222 ,") == ["nats://a:4222", "nats://b:4222"]
    with pytest.raises(BusError, match="no NATS server URL"):
        split_urls(" , ")


def test_free_ports_are_never_handed_out_twice_nor_an_outgoing_connections() -> None:
    """Ports for nodes started one after another: distinct across calls, and below the kernel's
    ephemeral range, where no outgoing connection takes one before its node binds it."""
    first, second = free_ports(5), free_ports(5)
    assert len(set(first + second)) == 10
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not ephemeral.exists():
        pytest.skip("the kernel's ephemeral range is Linux's /proc/sys/net/ipv4/ip_local_port_range")
    low, high = (int(n) for n in ephemeral.read_text().split())
    assert not any(low <= port <= high for port in first + second)


async def test_a_dead_server_first_in_the_list_is_skipped(settings: TektonSettings) -> None:
    dead = f"nats://127.0.0.1:{free_ports(1)[0]}"
    listed = settings.model_copy(update={"nats_url": f"{dead},{settings.nats_url}"})
    async with in_process_specialists(listed, "apollo"), Bus.connect(listed) as bus:
        assert (await bus.ask("apollo", "hi")).text == "apollo heard: hi"
        assert session_replicas(bus.nc, None) == 1  # a single server: sessions unreplicated
        assert session_replicas(bus.nc, 3) == 3
        result = await run_aish(listed, "-c", 'apollo << "from aish"')
        assert result.returncode == 0, result.stderr
        assert "apollo heard: from aish" in result.stdout


async def test_no_server_of_the_list_answering_is_one_clear_error(settings: TektonSettings) -> None:
    urls = ",".join(f"nats://127.0.0.1:{p}" for p in free_ports(2))
    with pytest.raises(NatsUnavailable, match=r"no NATS server answers at nats://127\.0\.0\.1:"):
        await connect(urls, connect_timeout=0.5)
    result = await run_aish(settings.model_copy(update={"nats_url": urls}), "-c", 'apollo << "x"')
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "no NATS server answers" in result.stderr
