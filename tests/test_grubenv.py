"""GRUB's environment block (ota/grubenv.py) and the GRUB backend that reads and writes it (ota/bootloader.py).

The format: signature line, `name=value` lines (`\\` escapes a backslash or a newline), `#` padding, always
exactly 1024 bytes. It carries no checksum, so a block torn at byte granularity can read as a clean mix of
two environments (test_byte_granular_tear_can_mix); what keeps the visible grubenv whole is that pitstop
replaces the file by rename and GRUB's own in-place save_env changes one digit in the first sector.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pitstop import crashpoint
from pitstop.ota import grubenv
from pitstop.ota.bootloader import GrubEnvBackend, env_from_vars, vars_from_env
from pitstop.ota.errors import BootEnvError
from pitstop.ota.slot_state import BootEnv

NAMES = {"a": "a", "b": "b"}
FACTORY = {"ORDER": "a b", "a_OK": "1", "a_TRY": "3", "b_OK": "0", "b_TRY": "0"}
SWITCHED = {"ORDER": "b a", "a_OK": "1", "a_TRY": "3", "b_OK": "1", "b_TRY": "3"}
ENVS: list[dict[str, str]] = [
    {},
    FACTORY,
    SWITCHED,
    {"ORDER": "", "a_OK": "0"},
    {"saved_entry": "pitstop_a", "x": "back\\slash", "y": "new\nline", "z": "\\\n\\\n", "e": ""},
    {"eq": "a=b=c", "hash": "#not a comment", "u": "grüße ✓", "sp": "  lead and trail  ", "cr": "a\rb"},
    {"big": "x" * 900},
    {f"v{i}": "y" * 40 for i in range(15)},  # crosses the 512-byte sector boundary
]


def fits(env: dict[str, str]) -> bool:
    try:
        grubenv.encode(env)
    except BootEnvError:
        return False
    return True


# --- format --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", ENVS, ids=range(len(ENVS)))
def test_round_trip(env: dict[str, str]) -> None:
    block = grubenv.encode(env)
    assert len(block) == grubenv.SIZE == 1024
    assert block.startswith(b"# GRUB Environment Block\n")
    assert grubenv.decode(block) == env
    assert list(grubenv.decode(block)) == list(env)  # order kept
    body = block.rstrip(b"#")
    assert block == body + b"#" * (1024 - len(body))
    assert grubenv.encode(grubenv.decode(block)) == block


def test_exact_bytes_and_escaping() -> None:
    block = grubenv.encode({"x": "a\\b\nc", "ORDER": "a b"})
    assert block.startswith(b"# GRUB Environment Block\nx=a\\\\b\\\nc\nORDER=a b\n#")
    # what grub-editenv writes for the factory environment
    want = b"# GRUB Environment Block\nORDER=a b\na_OK=1\na_TRY=3\nb_OK=0\nb_TRY=0\n"
    assert grubenv.encode(FACTORY) == want + b"#" * (1024 - len(want))
    # a backslash before any other character is that character (GRUB's reading)
    raw = b"# GRUB Environment Block\nq=\\q\\#\n"
    assert grubenv.decode(raw + b"#" * (1024 - len(raw))) == {"q": "q#"}


def test_size_limit_is_exact() -> None:
    head = len(grubenv.SIGNATURE) + len(b"v=\n")
    exactly = {"v": "x" * (1024 - head)}
    block = grubenv.encode(exactly)
    assert len(block) == 1024 and not block.endswith(b"#")  # no padding left, still one block
    assert grubenv.decode(block) == exactly
    with pytest.raises(BootEnvError, match="needs 1025 bytes"):
        grubenv.encode({"v": "x" * (1025 - head)})
    # escapes count: 500 newlines take 1000 bytes
    with pytest.raises(BootEnvError, match="grubenv holds 1024"):
        grubenv.encode({"v": "\n" * 500})
    with pytest.raises(BootEnvError):
        grubenv.encode({f"v{i}": "y" * 40 for i in range(30)})


@pytest.mark.parametrize("name", ["", "a-b", "a=b", "a b", "ä", "#x", "x\n"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(BootEnvError, match="bad boot environment variable name"):
        grubenv.encode({name: "1"})


# --- torn, truncated and foreign blocks ----------------------------------------------------------------


@pytest.mark.parametrize("env", [FACTORY, ENVS[4], ENVS[6]], ids=["factory", "escapes", "big"])
def test_truncated_at_every_length(env: dict[str, str]) -> None:
    block = grubenv.encode(env)
    for n in range(1024):
        with pytest.raises(BootEnvError, match="not 1024"):
            grubenv.decode(block[:n])
    for extra in (b"#", b"\n", b"\0" * 512):
        with pytest.raises(BootEnvError, match="not 1024"):
            grubenv.decode(block + extra)


def tear_outcomes(old: dict[str, str], new: dict[str, str], cuts: range) -> list[tuple[int, dict[str, str]]]:
    """Cuts at which `new`'s first k bytes over `old`'s rest decode cleanly to something neither was."""
    o, n = grubenv.encode(old), grubenv.encode(new)
    wrong = []
    for k in cuts:
        try:
            got = grubenv.decode(n[:k] + o[k:])
        except BootEnvError:
            continue
        if got not in (old, new):
            wrong.append((k, got))
    return wrong


PAIRS = [(a, b) for a in ENVS for b in ENVS if a is not b]


def body_size(env: dict[str, str]) -> int:
    return len(grubenv.encode(env).rstrip(b"#"))


def test_sector_granular_tear_is_old_new_or_refused() -> None:
    """Storage writes whole sectors: a tear lands at 512. Whenever both blocks' contents fit in the first
    sector (every environment pitstop writes does), a torn write is the old block or the new one."""
    small = [(o, n) for o, n in PAIRS if max(body_size(o), body_size(n)) <= 512]
    assert len(small) > 20
    for old, new in small:
        assert tear_outcomes(old, new, range(0, 1025, 512)) == [], (old, new)


def test_grub_save_env_tear_is_old_or_new() -> None:
    """GRUB's save_env rewrites the block in place, changing one slot's TRY digit: torn at any byte, the
    block is the old one or the new one."""
    for env in (FACTORY, SWITCHED, {**SWITCHED, "saved_entry": "x", "a_TRY": "9"}):
        booted, after = env_from_vars(env, NAMES).after_boot()
        assert booted is not None
        new = {**env, **vars_from_env(after, NAMES)}
        assert new != env
        assert tear_outcomes(env, new, range(1025)) == []


@pytest.mark.xfail(strict=True, reason="a block without pitstop's generation markers (grub-editenv's, the "
                   "factory's) has no checksum: a byte-granular tear can read as a clean mix")
def test_byte_granular_tear_can_mix() -> None:
    assert tear_outcomes(FACTORY, SWITCHED, range(1025)) == []


def test_generation_markers_turn_every_tear_into_old_new_or_refused() -> None:
    """What pitstop writes is bracketed by a generation number first and last: a byte-granular tear of one of
    its writes over the previous one reads as the old block, the new block, or is refused."""
    for old, new in PAIRS:
        o = grubenv.encode(grubenv.with_generation(old, 6))
        n = grubenv.encode(grubenv.with_generation(new, 7))
        for k in range(1025):
            try:
                got = grubenv.decode(n[:k] + o[k:])
                grubenv.check_generation(got)
            except BootEnvError:
                continue
            assert got in (grubenv.decode(o), grubenv.decode(n)), (old, new, k, got)


def test_backend_bumps_the_generation_and_refuses_disagreeing_markers(esp: Path) -> None:
    be = GrubEnvBackend(esp, NAMES)
    for gen in (1, 2, 3):
        be.write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 3, "b": gen}))
        assert grubenv.check_generation(grubenv.decode(esp.read_bytes())) == gen
    env = grubenv.decode(esp.read_bytes())
    env["pitstop_gen_end"] = "2"
    esp.write_bytes(grubenv.encode(env))
    with pytest.raises(BootEnvError, match="torn write"):
        be.read()


def block_with(body: bytes, pad: bytes = b"#") -> bytes:
    raw = grubenv.SIGNATURE + body
    return raw + pad * (1024 - len(raw))


@pytest.mark.parametrize("block, message", [
    (b"\0" * 1024, "signature"),
    (b"#" * 1024, "signature"),
    (b"# GRUB environment block\n" + b"#" * 999, "signature"),
    (block_with(b"ORDER=a b\n", b"\0"), "unterminated"),
    (block_with(b"ORDER=a b\n###\0"), "after its padding"),
    (block_with(b"no equals sign\n"), "malformed line"),
    (block_with(b"=value\n"), "malformed line"),
    (block_with(b"bad-name=1\n"), "malformed line"),
    (block_with(b"v=\xff\xfe\n"), "not UTF-8"),
    (grubenv.SIGNATURE + b"v=" + b"x" * (1024 - len(grubenv.SIGNATURE) - 2), "unterminated"),
    (grubenv.SIGNATURE + b"v=" + b"x" * (1024 - len(grubenv.SIGNATURE) - 3) + b"\\", "unterminated"),
], ids=["zeros", "hashes", "signature-case", "nul-padding", "nul-in-padding", "no-equals", "no-name", "bad-name",
        "not-utf8", "unterminated", "trailing-backslash"])
def test_foreign_blocks_refused(block: bytes, message: str) -> None:
    assert len(block) == 1024
    with pytest.raises(BootEnvError, match=message):
        grubenv.decode(block)


def test_comment_lines_are_skipped() -> None:
    """As GRUB reads them (Debian's grub-editenv writes a warning comment); encode never writes one."""
    warning = b"# WARNING: Do not edit this file by tools other than grub-editenv!!!\n"
    assert grubenv.decode(block_with(warning + b"ORDER=a b\n#x=1\n##\nb_OK=0\n")) == {"ORDER": "a b", "b_OK": "0"}
    assert grubenv.decode(block_with(b"ORDER=a b\n##\n")) == {"ORDER": "a b"}
    assert b"WARNING" not in grubenv.encode(grubenv.decode(block_with(warning + b"ORDER=a b\n")))


def test_garbage_refused() -> None:
    rng = random.Random(3)
    for _ in range(300):
        with pytest.raises(BootEnvError):
            grubenv.decode(rng.randbytes(1024))
        with pytest.raises(BootEnvError):
            grubenv.decode(grubenv.SIGNATURE + rng.randbytes(1024 - len(grubenv.SIGNATURE)))


def test_bit_flips_refused_or_visible() -> None:
    """One flipped bit anywhere: refused, or a clean decode that differs (never the same env silently)."""
    block = grubenv.encode(SWITCHED)
    for pos in range(1024):
        for bit in range(8):
            bad = bytearray(block)
            bad[pos] ^= 1 << bit
            try:
                got = grubenv.decode(bytes(bad))
            except BootEnvError:
                continue
            assert got != SWITCHED, (pos, bit)


# --- the GRUB backend ----------------------------------------------------------------------------------


@pytest.fixture
def esp(tmp_path: Path) -> Path:
    path = tmp_path / "esp" / "grubenv"
    path.parent.mkdir()
    path.write_bytes(grubenv.encode({"saved_entry": "x\ny", **FACTORY, "pitstop_note": "keep\\me"}))
    return path


def test_backend_reads_slot_names_and_keeps_unknown_variables(esp: Path) -> None:
    be = GrubEnvBackend(esp, {"a": "A", "b": "B"})
    esp.write_bytes(grubenv.encode({"saved_entry": "x\ny", "ORDER": "B A", "A_OK": "1", "A_TRY": "2", "B_OK": "1",
                                    "B_TRY": "3", "pitstop_note": "keep\\me"}))
    env = be.read()
    assert env == BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 2, "b": 3})
    be.write(BootEnv(("a", "b"), {"a": True, "b": False}, {"a": 3, "b": 0}))
    got = grubenv.decode(esp.read_bytes())
    assert got == {"pitstop_gen": "1", "saved_entry": "x\ny", "ORDER": "A B", "A_OK": "1", "A_TRY": "3",
                   "B_OK": "0", "B_TRY": "0", "pitstop_note": "keep\\me", "pitstop_gen_end": "1"}
    assert len(esp.read_bytes()) == 1024
    assert os.listdir(esp.parent) == ["grubenv"]


def test_backend_write_replaces_the_file(esp: Path) -> None:
    """Never in place: the old inode stays whole (GRUB or a reader holding it sees the old block)."""
    be = GrubEnvBackend(esp, NAMES)
    with open(esp, "rb") as held:
        ino = os.fstat(held.fileno()).st_ino
        be.write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 3, "b": 3}))
        assert os.stat(esp).st_ino != ino
        assert grubenv.decode(held.read())["ORDER"] == "a b"
    assert grubenv.decode(esp.read_bytes())["ORDER"] == "b a"


@pytest.mark.parametrize("values, want", [
    ({"ORDER": "b a c b", "a_OK": "1", "a_TRY": "3", "b_OK": "1", "b_TRY": "9"},
     BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 3, "b": 9})),
    ({"ORDER": "", "a_OK": "yes", "a_TRY": "10", "b_OK": "01", "b_TRY": "-1"},
     BootEnv((), {"a": False, "b": False}, {"a": 0, "b": 0})),
    ({}, BootEnv((), {"a": False, "b": False}, {"a": 0, "b": 0})),
    ({"ORDER": "  a\tb ", "a_TRY": "x", "b_TRY": " 3"},
     BootEnv(("a", "b"), {"a": False, "b": False}, {"a": 0, "b": 0})),
])
def test_malformed_values_read_as_the_safe_choice(values: dict[str, str], want: BootEnv) -> None:
    assert env_from_vars(values, NAMES) == want


def test_vars_round_trip() -> None:
    env = BootEnv(("b", "a"), {"a": False, "b": True}, {"a": 0, "b": 7})
    assert vars_from_env(env, {"a": "A", "b": "B"}) == {"ORDER": "B A", "A_OK": "0", "A_TRY": "0", "B_OK": "1",
                                                       "B_TRY": "7"}
    assert env_from_vars(vars_from_env(env, NAMES), NAMES) == env


@pytest.mark.parametrize("content, message", [
    (None, "no GRUB environment"),
    (b"", "not 1024"),
    (grubenv.encode(FACTORY)[:700], "not 1024"),
    (b"garbage" * 200, "not 1024"),
    (b"x" * 1024, "signature"),
])
def test_backend_refuses_missing_or_torn_file(esp: Path, content: bytes | None, message: str) -> None:
    if content is None:
        esp.unlink()
    else:
        esp.write_bytes(content)
    be = GrubEnvBackend(esp, NAMES)
    with pytest.raises(BootEnvError, match=message) as exc:
        be.read()
    assert str(esp) in exc.value.message and "\n" not in exc.value.message
    before = esp.read_bytes() if esp.exists() else None
    with pytest.raises(BootEnvError):  # write reads first (it keeps unknown variables): nothing written
        be.write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 3, "b": 3}))
    assert (esp.read_bytes() if esp.exists() else None) == before
    assert sorted(os.listdir(esp.parent)) == ([] if content is None else ["grubenv"])


def test_backend_refuses_an_environment_that_does_not_fit(esp: Path) -> None:
    esp.write_bytes(grubenv.encode({"pad": "z" * 900, **FACTORY}))
    before = esp.read_bytes()
    with pytest.raises(BootEnvError, match="grubenv holds 1024"):
        GrubEnvBackend(esp, {"a": "slot_a_long", "b": "slot_b_long"}).write(
            BootEnv(("a", "b"), {"a": True, "b": True}, {"a": 3, "b": 3}))
    assert esp.read_bytes() == before and os.listdir(esp.parent) == ["grubenv"]


class Boom(Exception):
    pass


def test_crash_after_half_the_block_leaves_old_file_and_no_temporaries(esp: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    before = esp.read_bytes()
    calls: list[str] = []

    def hit(name: str) -> None:
        calls.append(name)
        if name == "grubenv-write" and len(calls) == 1:
            # the first 512 bytes sit flushed in the temporary file
            tmps = [p for p in esp.parent.iterdir() if p.name != "grubenv"]
            assert len(tmps) == 1 and tmps[0].stat().st_size == 512
            raise Boom

    monkeypatch.setattr(crashpoint, "hit", hit)
    with pytest.raises(Boom):
        GrubEnvBackend(esp, NAMES).write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 3, "b": 3}))
    assert esp.read_bytes() == before
    assert os.listdir(esp.parent) == ["grubenv"]


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failing_write_leaves_old_file_and_no_temporaries(esp: Path, monkeypatch: pytest.MonkeyPatch,
                                                          where: str) -> None:
    before = esp.read_bytes()

    def fail(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    if where == "write":
        real_hit = crashpoint.hit
        monkeypatch.setattr(crashpoint, "hit", lambda name: fail() if name == "grubenv-write" else real_hit(name))
    elif where == "fsync":
        monkeypatch.setattr("pitstop.atomic.os.fsync", fail)
    else:
        monkeypatch.setattr("pitstop.atomic.os.replace", fail)
    with pytest.raises(OSError, match="No space"):
        GrubEnvBackend(esp, NAMES).write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 3, "b": 3}))
    monkeypatch.undo()
    assert esp.read_bytes() == before
    assert os.listdir(esp.parent) == ["grubenv"]


@pytest.mark.parametrize("n", [1, 2])
def test_sigkill_mid_write_leaves_old_file(esp: Path, n: int) -> None:
    """A real kill (no exception handler runs): the visible grubenv is the old block; the next write works."""
    before = esp.read_bytes()
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pitstop.ota.bootloader import GrubEnvBackend
        from pitstop.ota.slot_state import BootEnv
        GrubEnvBackend(Path({str(esp)!r}), {{"a": "a", "b": "b"}}).write(
            BootEnv(("b", "a"), {{"a": True, "b": True}}, {{"a": 3, "b": 3}}))
    """)
    env = {**os.environ, "PITSTOP_CRASHPOINT": f"grubenv-write:{n}"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60, check=False)
    assert r.returncode == -9, r.stderr
    assert esp.read_bytes() == before
    leftovers = [p for p in esp.parent.iterdir() if p.name != "grubenv"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".grubenv.")  # killed: nothing could clean up
    GrubEnvBackend(esp, NAMES).write(BootEnv(("b", "a"), {"a": True, "b": True}, {"a": 3, "b": 3}))
    assert grubenv.decode(esp.read_bytes())["ORDER"] == "b a"
