"""The D-Bus wire protocol, as much as a synchronous client needs: EXTERNAL authentication on a Unix socket,
marshalling of method calls whose arguments are strings, unmarshalling of any reply or signal, and finding the
bus from its address. daemon/client.py explains why the CLI does not load dbus-fast for this;
tests/test_daemon_client.py checks this reader and writer against dbus-fast's.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import socket

DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
BUS_ADDRESS_ENV = "PITSTOP_BUS_ADDRESS"  # another bus than the system bus: development, tests
CONNECT_TIMEOUT_S = 5.0  # connect, authenticate, Hello, NameHasOwner
DBUS = "org.freedesktop.DBus"  # the bus itself
DBUS_PATH = "/org/freedesktop/DBus"

# -- the wire protocol (https://dbus.freedesktop.org/doc/dbus-specification.html) ------------------------------

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NO_AUTO_START = 0x2
# Header fields.
F_PATH, F_INTERFACE, F_MEMBER, F_ERROR_NAME, F_REPLY_SERIAL, F_DESTINATION, F_SENDER, F_SIGNATURE = range(1, 9)
MAX_MESSAGE = 1 << 27  # the specification's limit, 128 MiB
MAX_VARIANT_DEPTH = 64

_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q", "d": "d", "h": "I"}
_ALIGN = {
    **dict.fromkeys("ygv", 1),
    **dict.fromkeys("nq", 2),
    **dict.fromkeys("biuhsoa", 4),
    **dict.fromkeys("xtd({", 8),
}
_BASIC = set(_FIXED) | set("sog")


class WireError(ValueError):
    """A message that does not follow the D-Bus wire format."""


class Message(NamedTuple):
    type: int
    serial: int
    body: tuple[Any, ...] = ()
    signature: str = ""
    path: str | None = None
    interface: str | None = None
    member: str | None = None
    error_name: str | None = None
    reply_serial: int | None = None
    destination: str | None = None
    sender: str | None = None
    flags: int = 0


def _type_end(sig: str, i: int, in_array: bool = False) -> int:
    """Index just past the single complete type starting at `sig[i]`."""
    if i >= len(sig):
        raise WireError(f"signature {sig!r} ends inside a type")
    c = sig[i]
    if c == "a":
        return _type_end(sig, i + 1, in_array=True)
    if c in "({":
        close = ")" if c == "(" else "}"
        j, members = i + 1, 0
        while j < len(sig) and sig[j] != close:
            j = _type_end(sig, j)
            members += 1
        if j >= len(sig) or members == 0:
            raise WireError(f"signature {sig!r}: unclosed or empty {c}")
        if c == "{" and (not in_array or members != 2 or sig[i + 1] not in _BASIC):
            raise WireError(f"signature {sig!r}: a dict entry is a basic key and a value, inside an array")
        return j + 1
    if c in _BASIC or c == "v":
        return i + 1
    raise WireError(f"signature {sig!r}: unknown type {c!r}")


def split_signature(sig: str) -> list[str]:
    """The complete types of a signature: 'sa{sv}(ii)' -> ['s', 'a{sv}', '(ii)']."""
    out, i = [], 0
    while i < len(sig):
        j = _type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


class _Reader:
    """Values out of one whole message (alignment is relative to its start)."""

    def __init__(self, data: bytes, little: bool) -> None:
        self.data, self.pos, self.order = data, 0, "<" if little else ">"

    def align(self, n: int) -> None:
        self.pos += -self.pos % n
        if self.pos > len(self.data):
            raise WireError("message ends inside padding")

    def _fixed(self, code: str) -> Any:
        fmt = self.order + _FIXED[code]
        size = struct.calcsize(fmt)
        self.align(size)
        if self.pos + size > len(self.data):
            raise WireError("message ends inside a value")
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return v

    def _text(self, n: int) -> str:
        end = self.pos + n
        if end >= len(self.data) or self.data[end] != 0:
            raise WireError("string without its terminating NUL")
        try:
            s = self.data[self.pos : end].decode()
        except UnicodeDecodeError:
            raise WireError("a string that is not UTF-8") from None
        self.pos = end + 1
        return s

    def value(self, t: str, depth: int = 0) -> Any:
        c = t[0]
        if c in _FIXED:
            v = self._fixed(c)
            return bool(v) if c == "b" else v
        if c in "so":
            return self._text(self._fixed("u"))
        if c == "g":
            return self._text(self._fixed("y"))
        if c == "v":
            if depth >= MAX_VARIANT_DEPTH:
                raise WireError("variants nested too deeply")
            inner = self._text(self._fixed("y"))
            types = split_signature(inner)
            if len(types) != 1:
                raise WireError(f"variant signature {inner!r} is not one type")
            return self.value(types[0], depth + 1)
        if c == "(":
            self.align(8)
            return tuple(self.value(m, depth) for m in split_signature(t[1:-1]))
        if c == "a":
            n = self._fixed("u")
            elem = t[1:]
            self.align(_ALIGN[elem[0]])
            end = self.pos + n
            if n > 1 << 26 or end > len(self.data):
                raise WireError("array longer than the message")
            if elem[0] == "{":
                key, val = split_signature(elem[1:-1])  # two types: _type_end checked it
                d = {}
                while self.pos < end:
                    self.align(8)
                    k = self.value(key, depth)
                    d[k] = self.value(val, depth)
                return d
            items = []
            while self.pos < end:
                items.append(self.value(elem, depth))
            return items
        raise WireError(f"unexpected type {t!r}")


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def align(self, n: int) -> None:
        self.buf += b"\0" * (-len(self.buf) % n)

    def u32(self, v: int) -> None:
        self.align(4)
        self.buf += struct.pack("<I", v)

    def string(self, s: str) -> None:
        b = s.encode()
        self.u32(len(b))
        self.buf += b + b"\0"

    def signature(self, s: str) -> None:
        self.buf += bytes([len(s)]) + s.encode() + b"\0"


def marshal(msg: Message) -> bytes:
    """A message whose body is strings only (every call this client makes), little-endian."""
    if set(msg.signature) - {"s"} or len(msg.signature) != len(msg.body):
        raise ValueError(f"this client sends string arguments only, not ({msg.signature})")
    body = _Writer()
    for arg in msg.body:
        body.string(arg)
    fields: list[tuple[int, str, str | int]] = [
        (code, sig, value)
        for code, sig, value in (
            (F_PATH, "o", msg.path),
            (F_INTERFACE, "s", msg.interface),
            (F_MEMBER, "s", msg.member),
            (F_ERROR_NAME, "s", msg.error_name),
            (F_REPLY_SERIAL, "u", msg.reply_serial),
            (F_DESTINATION, "s", msg.destination),
            (F_SIGNATURE, "g", msg.signature or None),
        )
        if value is not None
    ]
    w = _Writer()
    w.buf += struct.pack("<cBBBII", b"l", msg.type, msg.flags, 1, len(body.buf), msg.serial)
    w.u32(0)  # the header fields' length, patched below
    start = len(w.buf)
    for code, sig, value in fields:
        w.align(8)
        w.buf.append(code)
        w.signature(sig)
        if isinstance(value, int):
            w.u32(value)
        elif sig == "g":
            w.signature(value)
        else:
            w.string(value)
    struct.pack_into("<I", w.buf, 12, len(w.buf) - start)
    w.align(8)
    return bytes(w.buf + body.buf)


def unmarshal(data: bytes) -> Message:
    """One whole message (as `message_length` measures it)."""
    if len(data) < 16 or data[:1] not in (b"l", b"B"):
        raise WireError("not a D-Bus message")
    r = _Reader(data, data[:1] == b"l")
    r.pos = 12
    fields = dict(r.value("a(yv)"))
    r.align(8)
    sig = str(fields.get(F_SIGNATURE, ""))
    body = tuple(r.value(t) for t in split_signature(sig))
    return Message(
        type=data[1],
        flags=data[2],
        serial=struct.unpack_from(r.order + "I", data, 8)[0],
        body=body,
        signature=sig,
        path=fields.get(F_PATH),
        interface=fields.get(F_INTERFACE),
        member=fields.get(F_MEMBER),
        error_name=fields.get(F_ERROR_NAME),
        reply_serial=fields.get(F_REPLY_SERIAL),
        destination=fields.get(F_DESTINATION),
        sender=fields.get(F_SENDER),
    )


def message_length(head: bytes) -> int:
    """The whole message's length from its first 16 bytes."""
    order = "<" if head[:1] == b"l" else ">"
    body_len, _serial, fields_len = struct.unpack_from(order + "III", head, 4)
    return int(16 + fields_len + (-fields_len % 8) + body_len)


class Connection:
    """A blocking connection to a bus: authenticated (EXTERNAL), Hello said."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._serial = 0
        self.unique_name = ""

    @classmethod
    def open(cls, address: str, timeout: float = CONNECT_TIMEOUT_S) -> Connection:
        import socket  # noqa: PLC0415 - only once there is a bus socket to talk to

        path = _unix_socket(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            conn = cls(sock)
            conn._auth()
            conn.unique_name = str(conn.call(DBUS, DBUS_PATH, DBUS, "Hello")[0])
        except BaseException:
            sock.close()
            raise
        return conn

    def close(self) -> None:
        self.sock.close()

    def _auth(self) -> None:
        uid = str(os.geteuid()).encode().hex()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        line = self._read_line()
        if not line.startswith(b"OK "):
            raise WireError(f"the bus refused authentication: {line[:80]!r}")
        self.sock.sendall(b"BEGIN\r\n")

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill()
            if len(self._buf) > 4096:
                raise WireError("authentication line too long")
        line, _, rest = bytes(self._buf).partition(b"\r\n")
        self._buf = bytearray(rest)
        return line

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the bus closed the connection")
        self._buf += chunk

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read(self) -> Message:
        """The next message from the bus (blocks up to the socket's timeout)."""
        head = self._exactly(16)
        size = message_length(head)
        if size > MAX_MESSAGE:
            raise WireError(f"a message of {size} bytes")
        return unmarshal(head + self._exactly(size - 16))

    def send(self, dest: str, path: str, iface: str, member: str, sig: str = "", *args: str) -> int:
        self._serial += 1
        flags = 0 if dest == DBUS else NO_AUTO_START  # never start a service by bus activation
        self.sock.sendall(
            marshal(Message(METHOD_CALL, self._serial, args, sig, path, iface, member, destination=dest, flags=flags))
        )
        return self._serial

    def wait_reply(self, serial: int) -> Message:
        """The reply to call `serial`. Signals that come first are dropped: every call of this client is made
        before the signals it waits for (Install: they belong to an earlier job)."""
        while True:
            msg = self.read()
            if msg.type in (METHOD_RETURN, ERROR) and msg.reply_serial == serial:
                if msg.type == ERROR:
                    raise RemoteError(msg.error_name or "", str(msg.body[0]) if msg.body else "")
                return msg

    def call(self, dest: str, path: str, iface: str, member: str, sig: str = "", *args: str) -> tuple[Any, ...]:
        return self.wait_reply(self.send(dest, path, iface, member, sig, *args)).body


class RemoteError(Exception):
    """An error reply: its D-Bus name and message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


# -- finding the bus ----------------------------------------------------------------------------------------


def bus_address() -> str:
    """$PITSTOP_BUS_ADDRESS, else $DBUS_SYSTEM_BUS_ADDRESS, else the default system bus."""
    return os.environ.get(BUS_ADDRESS_ENV) or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS


def _unescape(value: str) -> str:
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _transports(address: str) -> Iterator[tuple[str, dict[str, str]]]:
    for transport in address.split(";"):
        kind, _, options = transport.partition(":")
        opts = {k: _unescape(v) for k, _, v in (o.partition("=") for o in options.split(",") if o)}
        yield kind, opts


def _unix_socket(address: str) -> str:
    """The first Unix socket of `address` (a path, or '\\0name' for an abstract one)."""
    for kind, opts in _transports(address):
        if kind == "unix" and "path" in opts:
            return opts["path"]
        if kind == "unix" and "abstract" in opts:
            return "\0" + opts["abstract"]
    raise WireError(f"no unix:path= or unix:abstract= socket in {address!r} (the only transports this client uses)")


def bus_may_exist(address: str) -> bool:
    """False when no transport of `address` can be a bus to connect to: every `unix:path=` socket missing (or
    not a socket), no abstract one. Checked without loading anything."""
    for kind, opts in _transports(address):
        if kind != "unix":
            continue
        if "abstract" in opts:
            return True
        try:
            if "path" in opts and stat.S_ISSOCK(os.stat(opts["path"]).st_mode):
                return True
        except OSError:
            continue
    return False
