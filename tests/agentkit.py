"""The update agent on a file-backed device, one "boot" at a time (a fresh core and agent continuing from what
is on disk), for the agent's own tests and for the site server's."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from devicekit import TestDevice

from pitstop.daemon.config import UpdateConfig
from pitstop.daemon.core import DaemonCore
from pitstop.daemon.ddi import DdiClient, TargetToken
from pitstop.daemon.supervisor import Supervisor
from pitstop.daemon.update_agent import UpdateAgent

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


class Units:
    """systemd as the gate sees it: the ActiveState of each required unit, set by the test."""

    def __init__(self, **states: str) -> None:
        self.states = states
        self.asked: list[tuple[str, ...]] = []

    def __call__(self, units: Sequence[str]) -> dict[str, str]:
        self.asked.append(tuple(units))
        return {u: self.states.get(u, "inactive") for u in units}


@dataclasses.dataclass
class Boot:
    """One boot of the device: its core and agent, and the reboots they asked for."""

    core: DaemonCore
    agent: UpdateAgent
    reboots: list[str]


@asynccontextmanager
async def boot(dev: TestDevice, cfg: UpdateConfig, *, units: Units | None = None,
               loops: Supervisor | None = None) -> AsyncIterator[Boot]:  # fmt: skip
    reboots: list[str] = []
    core = DaemonCore(dev.config(), loops=loops, reboot=lambda: reboots.append("reboot"))
    client = None
    if cfg.server is not None:
        assert cfg.controller_id is not None and cfg.token is not None
        client = DdiClient(cfg.server, cfg.tenant, cfg.controller_id, auth=TargetToken(cfg.token))
    names = tuple(loops.names()) if loops is not None else ()
    agent = UpdateAgent(core, cfg, dev.data / "pitstop" / "daemon", client=client, loops=loops,
                        enabled_loops=lambda: names, units=units or Units(**{"app.service": "active"}),
                        gate_interval_s=0.05)  # fmt: skip
    core.flow = agent
    await agent.resume()
    try:
        yield Boot(core, agent, reboots)
    finally:
        await agent.close()
        agent.shutdown()
        await core.close()
        if client is not None:
            client.close()


def state_dir(dev: TestDevice) -> Path:
    return dev.data / "pitstop" / "daemon"


def settled_boot(dev: TestDevice, cfg: UpdateConfig, *, units: Units | None = None) -> Boot:
    """Boot, let the agent carry on from what is on disk as far as it goes, shut down."""

    async def main() -> Boot:
        async with boot(dev, cfg, units=units) as b:
            await b.agent.settled()
            return b

    return run(main())
