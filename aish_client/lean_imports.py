"""Imported first by aish_client.cli: nats-py and structlog without their optional extras."""

import sys

# A one-shot `aish` should start in a blink. Two libraries import optional extras it does not need:
# nats-py imports aiohttp (~0.3 s) only for ws:// servers (bus.client.connect brings it in for a
# ws:// URL), structlog imports rich for its tracebacks (aish's own markdown rendering imports rich
# when it draws on a terminal). Keep both out of those imports; later imports of them work as usual.
_HIDDEN = ("aiohttp", "rich")
if "nats" not in sys.modules and not any(name in sys.modules for name in _HIDDEN):
    for _name in _HIDDEN:
        sys.modules[_name] = None  # type: ignore[assignment]  # makes `import NAME` raise ImportError
    try:
        import nats.aio.transport  # noqa: F401
        import structlog  # noqa: F401
    finally:
        for _name in _HIDDEN:
            del sys.modules[_name]
