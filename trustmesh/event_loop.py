"""The event loop a long-running process runs on: uvloop where it is installed.

uvloop (libuv, with its transports and TLS layer compiled) takes a sidecar's own
per-call work down by about a tenth against asyncio's selector loop (`bench/`,
ADR 0012). It is a dependency on Linux and macOS; `asyncio` stays selectable, and
`auto` falls back to it where uvloop is missing.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable

from trustmesh.errors import ConfigError

__all__ = ["CHOICES", "loop_factory", "running_name"]

CHOICES = ("auto", "uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> LoopFactory | None:
    """The factory for `asyncio.Runner`, or None for asyncio's own loop."""
    if choice not in CHOICES:
        raise ConfigError(f"unknown event loop {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return None
    if importlib.util.find_spec("uvloop") is None:
        if choice == "uvloop":
            raise ConfigError(
                "event loop 'uvloop' requested but uvloop is not installed: "
                "pip install uvloop, or choose 'asyncio'"
            )
        return None
    import uvloop

    return uvloop.new_event_loop


def running_name() -> str:
    """`uvloop` or `asyncio`: the loop this coroutine runs on (for the start-up line)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.partition(".")[0] == "uvloop" else "asyncio"
