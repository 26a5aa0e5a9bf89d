"""One boot of a device's update agent, as a process a test can kill (tests/test_update_agent.py).

    python tests/agent_driver.py SYSTEM_TOML STATE_DIR SERVER_URL DEVICE TOKEN REBOOT_MARKER

Continues from what is on disk, polls the server once (unless a reboot is already asked for) and lets the
flow run as far as it goes without a reboot; a reboot request creates REBOOT_MARKER. PITSTOP_CRASHPOINT
kills it at a durable step (pitstop/crashpoint.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from pitstop.daemon.config import UpdateConfig
from pitstop.daemon.core import DaemonCore
from pitstop.daemon.ddi import DdiClient, TargetToken
from pitstop.daemon.update_agent import UpdateAgent
from pitstop.ota.system_config import load


async def main(system: str, state_dir: str, url: str, device: str, token: str, marker: str) -> None:
    core = DaemonCore(load(Path(system)), reboot=lambda: Path(marker).touch())
    cfg = UpdateConfig(server=url, controller_id=device, token=token, gate_deadline_s=10.0, gate_hold_s=0.2)
    client = DdiClient(url, "DEFAULT", device, auth=TargetToken(token))
    agent = UpdateAgent(core, cfg, Path(state_dir), client=client, gate_interval_s=0.05)
    core.flow = agent
    try:
        await agent.resume()
        await agent.settled()
        if not Path(marker).exists():
            await agent.check_now()
            await agent.settled()
    finally:
        await agent.close()
        agent.shutdown()
        client.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(*sys.argv[1:7]))
