"""docs/protocol.md says what the code does: its error table is the error policy, and its examples
run as written against a real nats-server with a gateway and specialists."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import anyio
import msgpack
import pytest

from bus.client import Bus
from bus.errors import POLICY, ErrorCode
from bus.settings import TektonSettings
from bus.subjects import chat_subject
from bus.wire import decode_frame, decode_request
from tests.helpers import in_process_gateway, in_process_specialists

DOC = Path(__file__).parent.parent / "docs" / "protocol.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)


def programs() -> list[str]:
    return [block for block in code_blocks("python") if "asyncio.run(" in block]


def request_example() -> dict[str, object]:
    (example,) = [block for block in code_blocks("python") if block.lstrip().startswith("{")]
    value = ast.literal_eval(example)
    assert isinstance(value, dict)
    return value


@pytest.mark.fast
def test_the_error_table_is_the_error_policy() -> None:
    text = DOC.read_text()
    table = text[text.index("| code | retryable | another may help |") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        code, _retryable, elsewhere, http, rpc, _when = (c.strip() for c in line.strip("|").split("|"))
        rows[ErrorCode(code.strip("`"))] = (elsewhere == "yes", int(http), int(rpc))
    assert set(rows) == set(ErrorCode)
    for code, policy in POLICY.items():
        assert rows[code] == (policy.elsewhere, policy.http, policy.rpc), code


@pytest.mark.fast
def test_the_request_example_is_a_valid_request() -> None:
    request = decode_request(msgpack.packb(request_example()))
    assert request.v == 1 and request.messages[0].content == "explain queue groups"


@pytest.mark.fast
def test_the_doc_has_the_examples_this_test_runs() -> None:
    assert len(programs()) == 2


@pytest.mark.anyio
async def test_the_request_example_streams_an_answer(settings: TektonSettings) -> None:
    async with in_process_specialists(settings, "apollo"), Bus.connect(settings) as bus:
        inbox, frames = await bus.open_inbox()
        await bus.nc.publish(chat_subject("apollo"), msgpack.packb(request_example()), reply=inbox)
        kinds = []
        while not kinds or kinds[-1] not in ("done", "error"):
            msg = await frames.get(10)
            assert msg is not None
            kinds.append(decode_frame(msg.data).type)
        assert kinds[0] == "start" and kinds[-1] == "done" and "chunk" in kinds


@pytest.mark.anyio
@pytest.mark.parametrize("index", range(2))
async def test_the_example_clients_run_as_written(
    settings: TektonSettings, tmp_path: Path, index: int
) -> None:
    script = tmp_path / "example.py"
    script.write_text(programs()[index])
    async with in_process_gateway(settings), in_process_specialists(settings, "apollo"):
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, str(script)],
                env={"NATS_URL": settings.nats_url, "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=60,
            )
        )
    assert done.returncode == 0, done.stderr
    assert "apollo heard:" in done.stdout


@pytest.mark.anyio
async def test_a_prefix_discovers_only_its_own_specialists(settings: TektonSettings) -> None:
    dev = settings.model_copy(update={"prefix": "dev"})
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_specialists(dev, "athena"),
        in_process_gateway(dev),
        Bus.connect(settings) as default_bus,
        Bus.connect(dev) as dev_bus,
    ):
        assert await default_bus.running_names() == ["apollo"]
        assert await dev_bus.running_names() == ["athena"]
        assert [v.name for v in await dev_bus.survey()] == ["athena"]
        assert [v.name for v in (await dev_bus.gateway.discover()).specialists] == ["athena"]
        assert sorted(s["name"] for s in await dev_bus.stats()) == ["athena", "gateway"]
        assert [s["name"] for s in await default_bus.stats()] == ["apollo"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1 not msgpack",
        msgpack.packb({"v": 1, "session": "x", "inbox": "_INBOX.>", "request": {"messages": []}}),
        msgpack.packb({"v": 2, "session": "x", "inbox": "_INBOX.a", "request": {"messages": []}}),
    ],
)
async def test_the_gateway_refuses_what_the_doc_refuses_with_bad_request(
    settings: TektonSettings, payload: bytes
) -> None:
    async with in_process_gateway(settings), Bus.connect(settings) as bus:
        reply = msgpack.unpackb(
            (await bus.nc.request("tekton.gateway.anonymous.session.chat", payload, timeout=5)).data
        )
        assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        assert reply["v"] == 1
