"""Fixtures of the scenarios: the site server, the bundles, a device flashed and provisioned for the server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitstop.hil.overlay import LOOP_NAME
from pitstop.hil.plugin import Rig, RigImage
from pitstop.hil.site import Device, SiteServer, Updates, make_updates
from pitstop.hil.target import Target


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SiteServer]:
    with SiteServer(tmp_path / "site") as s:
        yield s


@pytest.fixture(scope="session")
def updates(rig_image: RigImage, rig: Rig) -> Updates:
    return make_updates(rig_image, rig.repo / ".cache" / "hil" / "bundles")


@pytest.fixture
def device(target: Target, site: SiteServer, rig: Rig, image: Path, request: pytest.FixtureRequest) -> Device:
    """Flashed with the rig image, provisioned for the site server (updates and health reports) with a token of
    its own, powered on, up on slot a (the daemon committed it and printed PITSTOP-READY) and serving inference
    (the rig's loop delivered results: an update's health gate has its baseline)."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name.removeprefix("test_"))[:40].strip("-")
    dev_id = f"hil-{name}"
    token = site.add_device(dev_id)
    url = site.url(target.host_address)
    prov = rig.provision(dev_id, server_url=url, token=token, metrics_url=f"{url}/v1/metrics")
    target.flash(image, provision=prov)
    target.power_on()
    target.wait_ready("a", 600)
    target.wait_serving(LOOP_NAME, 600)
    return Device(target, site, dev_id, rig)
