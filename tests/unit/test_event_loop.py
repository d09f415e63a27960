"""Which event loop `--event-loop` gives, with and without uvloop installed."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from trustmesh import event_loop
from trustmesh.errors import ConfigError

uvloop = pytest.importorskip("uvloop")

# (choice, uvloop installed) -> the loop class a Runner gets, or the error's words
CASES = {
    "auto-with-uvloop": ("auto", True, uvloop.Loop),
    "auto-without-uvloop": ("auto", False, asyncio.BaseEventLoop),
    "uvloop-with-uvloop": ("uvloop", True, uvloop.Loop),
    "uvloop-without-uvloop": ("uvloop", False, "uvloop is not installed"),
    "asyncio-with-uvloop": ("asyncio", True, asyncio.BaseEventLoop),
    "unknown": ("libuv", True, "unknown event loop 'libuv'"),
}


@pytest.mark.parametrize(("choice", "installed", "want"), list(CASES.values()), ids=list(CASES))
def test_loop_factory(
    monkeypatch: pytest.MonkeyPatch, choice: str, installed: bool, want: type | str
) -> None:
    if not installed:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "uvloop" else real(name, *a),
        )
    if isinstance(want, str):
        with pytest.raises(ConfigError, match=want):
            event_loop.loop_factory(choice)
        return
    factory = event_loop.loop_factory(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, want)
        assert isinstance(loop, uvloop.Loop) == (want is uvloop.Loop)
