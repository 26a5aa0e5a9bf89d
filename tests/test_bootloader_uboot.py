"""The U-Boot backend against libubootenv's real fw_printenv/fw_setenv on a redundant file-backed environment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pitstop.errors import CommandError
from pitstop.ota.bootloader import UBootEnvBackend
from pitstop.ota.errors import BootEnvError
from pitstop.ota.slot_state import BootEnv
from pitstop.runner import run

ENV_SIZE = 0x4000


@pytest.fixture
def uboot(tmp_path: Path, tool: Callable[[str], str]) -> UBootEnvBackend:
    printenv, setenv = tool("fw_printenv"), tool("fw_setenv")
    copies = [tmp_path / "env0", tmp_path / "env1"]
    for c in copies:
        c.write_bytes(b"\0" * ENV_SIZE)
    config = tmp_path / "fw_env.config"
    config.write_text("".join(f"{c} 0x0 {ENV_SIZE:#x}\n" for c in copies))
    default = tmp_path / "default.env"
    default.write_text("ORDER=a b\na_OK=1\na_TRY=3\nb_OK=0\nb_TRY=0\nbootdelay=0\n")
    opts = f"-c {config} -f {default}"
    return UBootEnvBackend(f"{printenv} {opts}", f"{setenv} {opts}", {"a": "a", "b": "b"})


def test_reads_default_environment(uboot: UBootEnvBackend) -> None:
    env = uboot.read()
    assert env == BootEnv(("a", "b"), {"a": True, "b": False}, {"a": 3, "b": 0})


def test_write_then_read_round_trips_and_keeps_other_variables(uboot: UBootEnvBackend) -> None:
    new = BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 3, "b": 2})
    uboot.write(new)
    assert uboot.read() == new
    # Variables that are not ours survive (fw_setenv only sets what the script names).
    listing = run([*uboot.printenv]).text
    assert "bootdelay=0" in listing


def test_each_write_lands_whole(uboot: UBootEnvBackend) -> None:
    for i in range(1, 6):
        env = BootEnv(("a", "b") if i % 2 else ("b", "a"), {"a": True, "b": i % 2 == 0}, {"a": i, "b": 9 - i})
        uboot.write(env)
        assert uboot.read() == env


def test_missing_tool_is_a_readable_command_error(tmp_path: Path) -> None:
    b = UBootEnvBackend(str(tmp_path / "no-such-printenv"), str(tmp_path / "no-such-setenv"), {"a": "a", "b": "b"})
    with pytest.raises(CommandError, match="no-such-printenv"):
        b.read()


def test_unreadable_environment_is_a_boot_env_error(tmp_path: Path, tool: Callable[[str], str]) -> None:
    config = tmp_path / "fw_env.config"
    config.write_text(f"{tmp_path / 'missing-device'} 0x0 0x4000\n")
    b = UBootEnvBackend(f"{tool('fw_printenv')} -c {config}", f"{tool('fw_setenv')} -c {config}", {"a": "a", "b": "b"})
    with pytest.raises(BootEnvError, match="fw_printenv failed"):
        b.read()
