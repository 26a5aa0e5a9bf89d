"""Serve one D-Bus interface from its XML contract: Introspect, Properties, method calls checked against the
contract's signatures and, for privileged methods, against the caller's user; signals.

Why not dbus-fast's ServiceInterface: its methods cannot learn who called them, and the privileged methods
need exactly that (the bus policy is the first gate, this is the second). So the object is served by one
message handler that sees every call to its path, and the contract file is the single description of the
API: what is served, what is introspected and what docs/dbus-api.md documents are the same thing.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Interface, Node

from pitstop.daemon.errors import NotAuthorizedError
from pitstop.errors import PitstopError

log = logging.getLogger(__name__)

PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PEER = "org.freedesktop.DBus.Peer"
PRIVILEGED = "org.pitstop.Privileged"
EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"
ERROR_PREFIX = "org.pitstop.Error."

Method = Callable[..., Awaitable[Any]]
Getter = Callable[[], Any]


def may_control(uid: int, group: str) -> bool:
    """Root, or a user whose primary or supplementary groups include `group`."""
    if uid == 0:
        return True
    try:
        gid = grp.getgrnam(group).gr_gid
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(user.pw_name, user.pw_gid)


class ContractObject:
    """The object at `path` implementing the single interface of `contract` (XML). `methods` and `properties`
    must cover the contract exactly (checked here, so a contract change cannot go half-implemented)."""

    def __init__(
        self,
        bus: MessageBus,
        contract: str,
        path: str,
        *,
        methods: Mapping[str, Method],
        properties: Mapping[str, Getter],
        authorize: Callable[[int], bool],
    ) -> None:
        node = Node.parse(contract)
        if len(node.interfaces) != 1:
            raise ValueError("a contract describes exactly one interface")
        self.iface: Interface = node.interfaces[0]
        self.name = self.iface.name
        self.bus, self.path = bus, path
        self._methods = {m.name: m for m in self.iface.methods}
        self._props = {p.name: p for p in self.iface.properties}
        self._signals = {s.name: s for s in self.iface.signals}
        for kind, declared, given in (("method", self._methods, methods), ("property", self._props, properties)):
            if set(declared) != set(given):
                missing, extra = sorted(set(declared) - set(given)), sorted(set(given) - set(declared))
                raise ValueError(f"{self.name}: {kind}s not implemented {missing}, not in the contract {extra}")
        self._impl = dict(methods)
        self._get = dict(properties)
        self._authorize = authorize
        self._tasks: set[asyncio.Task[None]] = set()
        introspected = Node.default(path)
        introspected.interfaces.append(self.iface)
        self._introspection = introspected.tostring()

    def export(self) -> None:
        self.bus.add_message_handler(self._on_message)

    def unexport(self) -> None:
        self.bus.remove_message_handler(self._on_message)

    # -- signals -----------------------------------------------------------------------------------------

    def emit(self, signal: str, *args: Any) -> None:
        s = self._signals[signal]
        self.bus.send(Message.new_signal(self.path, self.name, signal, s.signature, list(args)))

    def properties_changed(self, *names: str) -> None:
        """PropertiesChanged for `names`, with their current values (those annotated const or false are not
        announced: clients read them when they need them)."""
        changed = {}
        for n in names:
            if self._props[n].annotations.get(EMITS_CHANGED, "true") == "true":
                changed[n] = Variant(self._props[n].signature, self._get[n]())
        if changed:
            self.bus.send(
                Message.new_signal(self.path, PROPERTIES, "PropertiesChanged", "sa{sv}as", [self.name, changed, []])
            )

    # -- calls -------------------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != self.path:
            return False
        if msg.interface not in (None, self.name, PROPERTIES, INTROSPECTABLE):
            return False  # Peer and unknown interfaces: dbus-fast's defaults answer
        task = asyncio.get_running_loop().create_task(self._dispatch(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _dispatch(self, msg: Message) -> None:
        try:
            reply = await self._handle(msg)
        except PitstopError as e:
            reply = Message.new_error(msg, ERROR_PREFIX + type(e).__name__.removesuffix("Error"), e.message)
        except Exception:
            # The traceback goes to the journal, never to the caller (it would disclose paths and versions).
            log.exception("D-Bus %s.%s failed", msg.interface, msg.member)
            reply = Message.new_error(msg, ERROR_PREFIX + "Internal", "internal error: see the daemon's journal")
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(reply)

    async def _handle(self, msg: Message) -> Message:
        if msg.interface == INTROSPECTABLE:
            if msg.member != "Introspect":
                return _unknown(msg)
            return Message.new_method_return(msg, "s", [self._introspection])
        if msg.interface == PROPERTIES:
            return self._properties(msg)
        m = self._methods.get(msg.member or "")
        if m is None:
            return _unknown(msg)
        if msg.signature != m.in_signature:
            return Message.new_error(
                msg,
                "org.freedesktop.DBus.Error.InvalidArgs",
                f"{m.name} takes ({m.in_signature}), got ({msg.signature})",
            )
        if m.annotations.get(PRIVILEGED) == "true":
            uid = await self._caller_uid(msg)
            if not self._authorize(uid):
                raise NotAuthorizedError(f"{m.name} needs root or the daemon's control group (uid {uid} is neither)")
        result = await self._impl[m.name](*msg.body)
        out = m.out_signature
        if not out:
            return Message.new_method_return(msg)
        body = list(result) if len(m.out_args) > 1 else [result]
        return Message.new_method_return(msg, out, body)

    def _properties(self, msg: Message) -> Message:
        if msg.member == "Get" and msg.signature == "ss":
            iface, name = msg.body
            p = self._props.get(name) if iface in (self.name, "") else None
            if p is None:
                return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownProperty", f"no property {name}")
            return Message.new_method_return(msg, "v", [Variant(p.signature, self._get[name]())])
        if msg.member == "GetAll" and msg.signature == "s":
            if msg.body[0] not in (self.name, ""):
                return Message.new_method_return(msg, "a{sv}", [{}])
            values = {n: Variant(p.signature, self._get[n]()) for n, p in self._props.items()}
            return Message.new_method_return(msg, "a{sv}", [values])
        if msg.member == "Set":
            return Message.new_error(msg, "org.freedesktop.DBus.Error.PropertyReadOnly", "every property is read-only")
        return _unknown(msg)

    async def _caller_uid(self, msg: Message) -> int:
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionUnixUser",
                signature="s",
                body=[msg.sender],
            )
        )
        if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
            raise NotAuthorizedError("the bus did not say who the caller is")
        return int(reply.body[0])


def _unknown(msg: Message) -> Message:
    return Message.new_error(
        msg,
        "org.freedesktop.DBus.Error.UnknownMethod",
        f"{msg.interface}.{msg.member} ({msg.signature}) is not a method of this object",
    )
