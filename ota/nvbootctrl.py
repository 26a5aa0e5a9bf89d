"""NVIDIA Jetson (JetPack 5/6, L4T R35/R36, UEFI) boot slots through `nvbootctrl -t rootfs` (docs/jetson.md).

The UEFI boot chain, not pitstop, owns the Jetson's boot state: which rootfs slot boots next (the *active*
slot), each slot's status (`normal` or `unbootable`) and its retry count, which L4TLauncher decrements at
every boot and refills only when the OS runs `nvbootctrl verify`. pitstop reads all of it with one
`dump-slots-info` and changes it with exactly two documented commands: `set-active-boot-slot N` and
`verify`. Everything else `BootEnv` can say is mapped to the nearest safe behaviour (see `plan`).

The parsers and `plan` are pure; `NvbootctrlBackend` runs the commands through `pitstop.runner.run`.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pitstop import crashpoint
from pitstop.ota.errors import BootEnvError
from pitstop.ota.slot_state import BootEnv
from pitstop.runner import Result, run

# nvbootctrl prints the rootfs slots as letters in some lines ("Current rootfs slot: A") and as numbers in
# others ("slot: 0, ..."), and takes numbers as arguments (`set-active-boot-slot 1`): A is 0 (APP), B is 1.
LETTERS = ("A", "B")
_SLOT_TOKENS = {"A": 0, "B": 1, "0": 0, "1": 1}
MAX_OUTPUT = 64 * 1024  # dump-slots-info prints five short lines; anything this long is not its output
TIMEOUT_S = 60.0

Command = tuple[str, ...]
VERIFY: Command = ("verify",)


class Status(StrEnum):
    NORMAL = "normal"
    UNBOOTABLE = "unbootable"


@dataclass(frozen=True)
class SlotInfo:
    retry_count: int
    status: Status

    @property
    def unbootable(self) -> bool:
        return self.status == Status.UNBOOTABLE


@dataclass(frozen=True)
class SlotsInfo:
    """`nvbootctrl -t rootfs dump-slots-info`: slots by index (0 = A, 1 = B)."""

    current: int  # the slot running now
    active: int  # the slot UEFI boots next
    slots: tuple[SlotInfo, SlotInfo]


def slot_index(token: str, what: str) -> int:
    """`A`/`B` or `0`/`1` (either case) → 0 or 1."""
    index = _SLOT_TOKENS.get(token.strip().upper())
    if index is None:
        raise BootEnvError(f"{what}: {token.strip()[:40]!r} is not a rootfs slot (A, B, 0 or 1)")
    return index


def _check_size(output: str, command: str) -> None:
    if len(output) > MAX_OUTPUT:
        raise BootEnvError(f"{command}: {len(output)} characters of output, more than {MAX_OUTPUT}")


def parse_current_slot(output: str) -> int:
    """`nvbootctrl [-t rootfs] get-current-slot`: one line holding the slot (`0`, or `A` in some releases).
    Other lines (informational messages) are skipped; no slot, or two different ones, is an error."""
    _check_size(output, "get-current-slot")
    found = {_SLOT_TOKENS[t] for line in output.splitlines() if (t := line.strip().upper()) in _SLOT_TOKENS}
    if not found:
        raise BootEnvError(f"get-current-slot: no slot in its output {output.strip()[:80]!r}")
    if len(found) > 1:
        raise BootEnvError(f"get-current-slot: more than one slot in its output {output.strip()[:80]!r}")
    return found.pop()


_LINE_KEYS = {"current rootfs slot": "current", "active rootfs slot": "active", "num_slots": "num_slots"}


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def _slot_line(line: str, where: str) -> tuple[int, SlotInfo]:
    """`slot: 0,             retry_count: 3,             status: normal` (fields in any order, any spacing;
    unknown fields are skipped)."""
    fields: dict[str, str] = {}
    for part in line.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition(":")
        if not sep:
            raise BootEnvError(f"{where}: {part.strip()[:40]!r} is not a 'name: value' field")
        fields[_key(key)] = value.strip()
    missing = [k for k in ("slot", "retry_count", "status") if k not in fields]
    if missing:
        raise BootEnvError(f"{where}: no {', '.join(missing)} (is this `nvbootctrl` without `-t rootfs`?)")
    index = slot_index(fields["slot"], where)
    retry = fields["retry_count"]
    if not retry.isdigit() or len(retry) > 3:
        raise BootEnvError(f"{where}: retry_count {retry[:20]!r} is not a small whole number")
    try:
        status = Status(fields["status"].lower())
    except ValueError:
        raise BootEnvError(f"{where}: status {fields['status'][:20]!r} is neither normal nor unbootable") from None
    return index, SlotInfo(int(retry), status)


def parse_dump_slots_info(output: str) -> SlotsInfo:
    """`nvbootctrl -t rootfs dump-slots-info` as L4T R35 and R36 print it (docs/jetson.md quotes them):

        Current rootfs slot: A
        Active rootfs slot: A
        num_slots: 2
        slot: 0,             retry_count: 3,             status: normal
        slot: 1,             retry_count: 3,             status: normal

    Spacing, letter case and the order of lines may vary and other lines are skipped; a line this parser
    needs that is missing, repeated or malformed is a `BootEnvError` naming it, never a guess."""
    what = "dump-slots-info"
    _check_size(output, what)
    values: dict[str, str] = {}
    slot_lines: list[tuple[str, str]] = []
    for n, raw in enumerate(output.splitlines(), 1):
        line = raw.strip()
        key, sep, value = line.partition(":")
        if not sep:
            continue
        where = f"{what} line {n}"
        name = _key(key)
        if name == "slot" or "slot" in {_key(part.partition(":")[0]) for part in line.split(",")[1:]}:
            slot_lines.append((where, line))
        elif name in _LINE_KEYS:
            if _LINE_KEYS[name] in values:
                raise BootEnvError(f"{where}: {key.strip()!r} appears twice")
            values[_LINE_KEYS[name]] = value.strip()
    if "current" not in values:
        raise BootEnvError(f"{what}: no 'Current rootfs slot' line (output of `nvbootctrl` without `-t rootfs`?)")
    if "active" not in values:
        raise BootEnvError(f"{what}: no 'Active rootfs slot' line")
    if "num_slots" not in values:
        raise BootEnvError(f"{what}: no 'num_slots' line")
    if values["num_slots"] != "2":
        raise BootEnvError(
            f"{what}: num_slots is {values['num_slots'][:20]!r}, not 2 "
            "(pitstop needs the two rootfs slots of a device flashed with ROOTFS_AB=1)"
        )
    slots: dict[int, SlotInfo] = {}
    for where, line in slot_lines:
        index, info = _slot_line(line, where)
        if index in slots:
            raise BootEnvError(f"{where}: slot {index} is listed twice")
        slots[index] = info
    if sorted(slots) != [0, 1]:
        missing = sorted({0, 1} - set(slots))
        raise BootEnvError(
            f"{what}: no 'slot: N, retry_count: …, status: …' line for slot {', '.join(map(str, missing))}"
        )
    return SlotsInfo(
        slot_index(values["current"], f"{what}: current rootfs slot"),
        slot_index(values["active"], f"{what}: active rootfs slot"),
        (slots[0], slots[1]),
    )


# -- the pure mapping ------------------------------------------------------------------------------------------


def env_from_info(info: SlotsInfo, names: Sequence[str]) -> BootEnv:
    """`names[i]` is the pitstop slot name of nvbootctrl slot i. Active slot first; OK means status normal; tries
    are UEFI's retry counts as they are now."""
    a = info.active
    return BootEnv(
        (names[a], names[1 - a]),
        {names[i]: not s.unbootable for i, s in enumerate(info.slots)},
        {names[i]: s.retry_count for i, s in enumerate(info.slots)},
    )


def plan(info: SlotsInfo, want: BootEnv, names: Sequence[str]) -> list[Command]:
    """The nvbootctrl commands (without `-t rootfs`) that turn `info` into `want`, in the order to run them.

    - `verify` first, if the running slot must boot and either `want` gives it more or other tries than UEFI's
      count has (a commit: `verify` refills the running slot's count to ROOTFS_RETRY_COUNT_MAX; it can set no
      other value), or it stays the next boot with no retries left (UEFI would mark it unbootable at the next
      boot, where GRUB's last resort would boot it anyway). It only ever adds retries to the slot that runs.
    - `set-active-boot-slot N` last, if the primary changes: the one command that moves the next boot away
      from the running slot, so an interruption before it leaves the running slot the next boot.

    What nvbootctrl cannot express:
    - a slot `want` keeps from booting (OK flag cleared) while UEFI has it `normal`: nvbootctrl has no
      documented command to mark a slot unbootable, so it only stops being the active slot; UEFI can still
      fall back to it once the active slot spends all its retries.
    - tries of a slot that is not running: only the bootloader sets those; a newly activated slot gets
      whatever count UEFI holds for it (ROOTFS_RETRY_COUNT_MAX unless it was tried since).
    Refused (`BootEnvError`, before anything runs): making a slot bootable that UEFI marked `unbootable`
    (nothing in nvbootctrl clears that), and activating a slot whose retry count is 0 (UEFI would mark it
    unbootable at the next boot instead of booting it)."""
    index = {name: i for i, name in enumerate(names)}
    if not want.order or any(s not in index for s in want.order):
        raise BootEnvError(f"cannot write boot order {list(want.order)}: rootfs slots are {', '.join(names)}")
    for i, name in enumerate(names):
        if want.ok.get(name, False) and info.slots[i].unbootable:
            raise BootEnvError(
                f"rootfs slot {LETTERS[i]} ({name}) is marked unbootable by UEFI and nvbootctrl "
                f"cannot clear that: set 'OS chain {LETTERS[i]} status' back to normal in the UEFI "
                f"menu (L4T Configuration) or reflash (docs/jetson.md)"
            )
    primary = index[want.order[0]]
    current = info.current
    cmds: list[Command] = []
    run_name = names[current]
    retry = info.slots[current].retry_count
    wanted = want.tries.get(run_name, 0)
    if want.ok.get(run_name, False) and (0 < wanted != retry or (primary == current and retry == 0)):
        cmds.append(VERIFY)
    if primary != info.active:
        name = names[primary]
        if primary != current and want.ok.get(name, False) and info.slots[primary].retry_count == 0:
            raise BootEnvError(
                f"rootfs slot {LETTERS[primary]} ({name}) has retry_count 0: UEFI would mark it "
                "unbootable at the next boot instead of booting it"
            )
        cmds.append(("set-active-boot-slot", str(primary)))
    return cmds


# -- the backend -----------------------------------------------------------------------------------------------


class NvbootctrlBackend:
    """`command` is how to run nvbootctrl (split like a shell command line, so it may carry options);
    `slot_names` maps slot name → boot name, the boot names being nvbootctrl's: `A`/`B` or `0`/`1`."""

    def __init__(self, command: str, slot_names: Mapping[str, str]) -> None:
        self.command = shlex.split(command)
        if not self.command:
            raise BootEnvError("nvbootctrl: empty command")
        by_index: dict[int, str] = {}
        for slot, boot_name in slot_names.items():
            i = slot_index(boot_name, f"slot {slot}: boot name")
            if i in by_index:
                raise BootEnvError(f"slots {by_index[i]} and {slot} are both nvbootctrl slot {LETTERS[i]}")
            by_index[i] = slot
        if sorted(by_index) != [0, 1]:
            raise BootEnvError("nvbootctrl needs two slots, boot names A and B (or 0 and 1)")
        self.names: tuple[str, str] = (by_index[0], by_index[1])

    def _run(self, *args: str) -> Result:
        argv = [*self.command, "-t", "rootfs", *args]
        r = run(argv, check=False, timeout=TIMEOUT_S)
        if r.returncode != 0:
            tail = r.stderr.decode(errors="replace").strip() or r.text.strip()
            detail = f": {tail.splitlines()[-1][:200]}" if tail else ""
            raise BootEnvError(f"{shlex.join(argv)} failed (exit status {r.returncode}){detail}")
        return r

    def info(self) -> SlotsInfo:
        r = self._run("dump-slots-info")
        try:
            return parse_dump_slots_info(r.text)
        except BootEnvError as e:
            raise BootEnvError(f"{self.command[0]} -t rootfs {e.message}") from None

    def read(self) -> BootEnv:
        return env_from_info(self.info(), self.names)

    def write(self, env: BootEnv) -> None:
        before = self.info()
        cmds = plan(before, env, self.names)
        for cmd in cmds:
            crashpoint.hit("nvbootctrl-write")
            self._run(*cmd)
        if cmds:
            self._check_landed(self.info(), env)

    def _check_landed(self, after: SlotsInfo, env: BootEnv) -> None:
        # An exit status of 0 is not proof that the UEFI variable changed, so the switch is read back. (This
        # cannot catch firmware that reads the change back fine and still boots the old chain, as in NVIDIA
        # forum topic 306475; docs/jetson.md.)
        primary = self.names.index(env.order[0])
        if after.active != primary:
            raise BootEnvError(
                f"nvbootctrl set-active-boot-slot {primary} did not take effect: the active rootfs "
                f"slot is still {LETTERS[after.active]}"
            )
