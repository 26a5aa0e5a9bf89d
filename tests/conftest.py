"""Shared test machinery: capability markers and the `tool` fixture.

Markers (declared in pyproject.toml):

- ``root``: skipped unless running as root (euid 0).
- ``gpu``: skipped unless ``nvidia-smi -L`` lists a GPU.
- ``vm``: skipped unless QEMU (``qemu-system-x86_64``) and OVMF firmware are installed.
- ``slow``: deselected by default (addopts ``-m 'not slow'``); ``./dev test-all`` runs them.

External tools: ``def test_x(tool): casync = tool("casync")`` returns the tool's path, or
skips the test when it is missing. With ``CI=true`` a missing tool FAILS the test instead:
CI installs every tool ``./dev env`` lists, so a missing one there is a bug, not a skip.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from bundlekit import Keys, make_keys

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
QEMU = "qemu-system-x86_64"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@functools.cache
def _root_missing() -> str | None:
    if os.geteuid() == 0:
        return None
    return f"needs root (euid is {os.geteuid()}); run as root to include these tests"


@functools.cache
def _gpu_missing() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "needs an NVIDIA GPU: nvidia-smi not found"
    try:
        res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"needs an NVIDIA GPU: `nvidia-smi -L` failed: {e}"
    if res.returncode != 0 or "GPU" not in res.stdout:
        detail = (res.stderr or res.stdout).strip().splitlines()
        return f"needs an NVIDIA GPU: `nvidia-smi -L` exited {res.returncode}: {detail[0] if detail else ''}"
    return None


@functools.cache
def _vm_missing() -> str | None:
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (apt package qemu-system-x86)")
    if not OVMF_CODE.is_file():
        missing.append(f"{OVMF_CODE} (apt package ovmf)")
    if missing:
        return "needs QEMU to boot VMs; missing: " + ", ".join(missing)
    return None


CAPABILITIES: dict[str, Callable[[], str | None]] = {
    "root": _root_missing,
    "gpu": _gpu_missing,
    "vm": _vm_missing,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, missing in CAPABILITIES.items():
            if item.get_closest_marker(marker) is None:
                continue
            reason = missing()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"[{marker}] {reason}"))


def find_tool(name: str) -> str:
    """Path of external tool `name`; skip the calling test if missing (fail under CI=true)."""
    path = shutil.which(name)
    if path is not None:
        return path
    msg = f"external tool {name!r} not found on PATH (./dev env installs those in APT_PACKAGES in ./dev)"
    if in_ci():
        pytest.fail(f"{msg}. CI=true: CI must have every tool, so this is an error.", pytrace=False)
    pytest.skip(msg)


@pytest.fixture
def tool() -> Callable[[str], str]:
    """``tool("casync")`` -> path of the tool; skips (or fails under CI=true) when missing."""
    return find_tool


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A development PKI (ECDSA P-256): root → intermediate → signing certificate."""
    return make_keys(tmp_path_factory.mktemp("keys") / "pki")


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A second, unrelated PKI: bundles it signs must not verify against `keys`' keyring."""
    return make_keys(tmp_path_factory.mktemp("other") / "pki", name="stranger")


@pytest.fixture(scope="session")
def ed_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A development PKI with Ed25519 keys."""
    return make_keys(tmp_path_factory.mktemp("ed") / "pki", "ed25519", name="ed dev")
