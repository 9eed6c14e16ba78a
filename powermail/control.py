"""The control socket: how `powermail queue ...` reaches the running server.

A UNIX socket at ``data_dir/control.sock``, mode 0600, that also checks the
peer's user id (SO_PEERCRED): only the server's own user may use it.  Each
request is one line of JSON, ``{"command": "queue.list", "id": ...}``; each
answer one line, ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": "..."}``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin

from powermail.queue.runner import QueueRunner
from powermail.queue.store import QueuedMessage

__all__ = ["ControlFactory", "ControlProtocol", "describe_entry"]

_log = Logger()
MAX_REQUEST = 4096
# Seconds a control connection may stay silent.
IDLE_TIMEOUT = 60


def describe_entry(entry: QueuedMessage, *, details: bool = False) -> dict[str, Any]:
    """What the control socket tells of one queued message."""
    summary: dict[str, Any] = {
        "id": entry.id,
        "sender": entry.sender,
        "size": entry.size,
        "created": entry.created,
        "next_attempt": entry.next_attempt,
        "attempts": entry.attempts,
        "held": entry.held,
        "recipients": [
            {
                "address": r.address,
                "next_hop": r.next_hop,
                "state": r.state,
                **({"last": _last_reply(r)} if r.text else {}),
                **({"remote_mta": r.remote_mta, "tls": r.tls} if details else {}),
            }
            for r in entry.recipients
        ],
    }
    return summary


def _last_reply(recipient: Any) -> str:
    """``450 4.2.0 text``; the code is left out when no server answered."""
    parts = (
        str(recipient.code) if recipient.code else None,
        recipient.status,
        recipient.text,
    )
    return " ".join(p for p in parts if p)


def _peer_uid(transport: Any) -> int | None:
    handle = transport.getHandle()
    try:
        data = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", data)
    return uid


class ControlProtocol(LineOnlyReceiver, TimeoutMixin):
    """One administrator's connection: requests and answers, a line each."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        self.setTimeout(IDLE_TIMEOUT)
        uid = _peer_uid(self.transport)
        if uid != os.getuid():
            _log.warn("control socket: refused user id {uid}", uid=uid)
            self._answer({"ok": False, "error": "permission denied"})
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:  # noqa: N802
        self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        self.setTimeout(None)

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802
        self._answer({"ok": False, "error": "request too long"})
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        self.resetTimeout()
        try:
            request = json.loads(line)
            command = request["command"]
        except (ValueError, KeyError, TypeError, RecursionError):
            self._answer({"ok": False, "error": "not a JSON request with a command"})
            return
        d = defer.maybeDeferred(self.factory.handle, command, request)
        d.addCallbacks(
            lambda result: self._answer({"ok": True, "result": result}),
            lambda failure: self._answer(
                {"ok": False, "error": failure.getErrorMessage()}
            ),
        )

    def _answer(self, answer: dict[str, Any]) -> None:
        self.sendLine(json.dumps(answer, ensure_ascii=False).encode("utf-8"))


class ControlError(Exception):
    """A request that cannot be carried out; its text goes to the client."""


class ControlFactory:
    """Carries out control requests against the queue runner."""

    protocol = ControlProtocol

    def __init__(self, runner: QueueRunner) -> None:
        self.runner = runner

    # twisted.internet.protocol.Factory's interface, without its logging.
    def doStart(self) -> None:  # noqa: N802
        pass

    def doStop(self) -> None:  # noqa: N802
        pass

    def buildProtocol(self, addr: Any) -> ControlProtocol:  # noqa: N802
        proto = ControlProtocol()
        proto.factory = self
        return proto

    def _id(self, request: dict[str, Any]) -> str:
        msg_id = request.get("id")
        if not isinstance(msg_id, str) or msg_id not in self.runner.queued_ids():
            raise ControlError(f"no queued message {msg_id}")
        return msg_id

    def handle(self, command: str, request: dict[str, Any]) -> Any:
        runner = self.runner
        if command == "queue.list":
            return runner.list_entries().addCallback(
                lambda entries: [describe_entry(e) for e in entries]
            )
        if command == "queue.show":
            return runner.get(self._id(request)).addCallback(
                lambda entry: describe_entry(entry, details=True)
            )
        if command == "queue.retry":
            if request.get("id") is not None:
                return runner.retry(self._id(request))
            return runner.retry()
        if command in ("queue.hold", "queue.release", "queue.delete"):
            msg_id = self._id(request)
            action = getattr(runner, command.split(".")[1])
            return action(msg_id).addCallback(lambda _: msg_id)
        raise ControlError(f"unknown command {command}")
