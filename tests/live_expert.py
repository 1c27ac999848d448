"""A scripted expert in its own process, so a test can kill it for real:
``python -m tests.live_expert URL EXPERT [HEARTBEAT_S] [DELAY_S]``."""

from __future__ import annotations

import sys

import anyio

from moe2.runtime.connection import close_nats, connect_nats
from tests.scripted import Script, ScriptedExpert


async def main(url: str, expert: str, heartbeat_s: float, delay_s: float) -> None:
    nc = await connect_nats(url, name=f"live-{expert}")
    try:
        script = Script(heartbeat_s=heartbeat_s, delay_s=delay_s)
        await ScriptedExpert(nc, expert, script).run()
    finally:
        await close_nats(nc)


if __name__ == "__main__":
    url, expert, *rest = sys.argv[1:]
    numbers = [float(x) for x in rest] + [1.0, 0.0][len(rest) :]
    anyio.run(main, url, expert, numbers[0], numbers[1])
