"""GRUB's environment block (`grubenv`): the exact format `grub-editenv` writes and GRUB's `save_env` rewrites.

A fixed 1024-byte file: the signature line, `name=value` lines (backslash escapes `\\` and a newline), then
`#` padding; lines starting with `#` are comments, as GRUB reads them. GRUB rewrites the file in place
through a block list, so it must never change size.
"""

from __future__ import annotations

from collections.abc import Mapping

from pitstop.ota.errors import BootEnvError

SIZE = 1024
SIGNATURE = b"# GRUB Environment Block\n"
_NAME_OK = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def _escape(value: str) -> bytes:
    raw = value.encode()
    return raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\\n")


def encode(env: Mapping[str, str]) -> bytes:
    """The 1024-byte block holding `env` (in the given order); BootEnvError if it does not fit."""
    body = bytearray(SIGNATURE)
    for name, value in env.items():
        if not name or not set(name.encode()) <= _NAME_OK:
            raise BootEnvError(f"bad boot environment variable name {name!r}")
        body += name.encode() + b"=" + _escape(value) + b"\n"
    if len(body) > SIZE:
        raise BootEnvError(f"boot environment needs {len(body)} bytes; grubenv holds {SIZE}")
    return bytes(body) + b"#" * (SIZE - len(body))


def decode(block: bytes) -> dict[str, str]:
    """Parse a grubenv block; BootEnvError for anything GRUB itself would not read as one."""
    if len(block) != SIZE:
        raise BootEnvError(f"grubenv is {len(block)} bytes, not {SIZE} (torn or foreign write)")
    if not block.startswith(SIGNATURE):
        raise BootEnvError("grubenv lacks the GRUB environment block signature (torn or foreign write)")
    env: dict[str, str] = {}
    pos = len(SIGNATURE)
    while pos < SIZE:
        if block[pos] == ord("#"):
            nl = block.find(b"\n", pos)
            if nl < 0:
                break  # the padding: '#' to the end
            pos = nl + 1  # a comment line, e.g. Debian grub-editenv's "# WARNING: Do not edit …"
            continue
        line = bytearray()
        while True:
            if pos >= SIZE:
                raise BootEnvError("grubenv has an unterminated line (torn write)")
            c = block[pos]
            pos += 1
            if c == ord("\\") and pos < SIZE:
                line.append(block[pos])
                pos += 1
            elif c == ord("\n"):
                break
            else:
                line.append(c)
        name, eq, value = bytes(line).partition(b"=")
        if not eq or not name or not set(name) <= _NAME_OK:
            raise BootEnvError(f"grubenv has a malformed line {bytes(line)[:40]!r}")
        try:
            env[name.decode()] = value.decode()
        except UnicodeDecodeError:
            raise BootEnvError("grubenv holds a value that is not UTF-8") from None
    if block[pos:].strip(b"#"):
        raise BootEnvError("grubenv has data after its padding (torn or foreign write)")
    return env


# pitstop brackets its variables with a generation number, first and last in the block. GRUB ignores them
# and its own save_env rewrites single TRY digits in place, leaving both untouched; but a block torn by any
# in-place multi-variable write (a foreign tool, a FAT rename that went wrong) has new bytes up to the tear
# and old bytes after it, so the two numbers differ and the block is refused instead of read as a mix.
GEN_HEAD = "pitstop_gen"
GEN_TAIL = "pitstop_gen_end"


def check_generation(env: dict[str, str]) -> int:
    """The block's generation (0 when it has no markers: written by grub-editenv or the image builder);
    BootEnvError when the markers disagree."""
    head, tail = env.get(GEN_HEAD), env.get(GEN_TAIL)
    if head is None and tail is None:
        return 0
    if head != tail or head is None or not head.isdigit():
        raise BootEnvError(f"grubenv generation markers disagree ({head} / {tail}): torn write")
    keys = list(env)
    if keys[0] != GEN_HEAD or keys[-1] != GEN_TAIL:
        raise BootEnvError("grubenv generation markers are not first and last: torn or foreign write")
    return int(head)


def with_generation(env: dict[str, str], generation: int) -> dict[str, str]:
    """`env` bracketed by the markers of `generation` (any old markers dropped)."""
    body = {k: v for k, v in env.items() if k not in (GEN_HEAD, GEN_TAIL)}
    return {GEN_HEAD: str(generation), **body, GEN_TAIL: str(generation)}
