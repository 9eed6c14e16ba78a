"""A real second MX for the tests: an aiosmtpd server on loopback.

It records every transaction (envelope and exact bytes) and can refuse
recipients, answer 4xx a number of times first, or vanish.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from powermail_process import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class Behaviour:
    refuse: set[str] = field(default_factory=set)
    # recipient -> how many more times to answer 451 at RCPT
    defer: dict[str, int] = field(default_factory=dict)


class _Handler:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.received: list[Received] = []
        self.rcpt_asked: list[str] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: N802
        self.rcpt_asked.append(address)
        if address in self.behaviour.refuse:
            return "550 5.1.1 no such user here"
        left = self.behaviour.defer.get(address, 0)
        if left:
            self.behaviour.defer[address] = left - 1
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        with self.lock:
            self.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                )
            )
        return "250 2.0.0 OK stored"


class SecondMx:
    """Start with ``start()``; ``received`` lists what it accepted."""

    def __init__(
        self,
        port: int | None = None,
        behaviour: Behaviour | None = None,
        *,
        tls_context=None,
    ):
        self.port = port or free_port()
        self.behaviour = behaviour or Behaviour()
        self.handler = _Handler(self.behaviour)
        self.controller = Controller(
            self.handler,
            hostname="127.0.0.1",
            port=self.port,
            enable_SMTPUTF8=True,
            tls_context=tls_context,
        )

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def start(self) -> SecondMx:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.received) >= count:
                return self.received
            time.sleep(0.05)
        raise AssertionError(f"second MX got {len(self.received)} of {count} messages")


__all__ = ["Behaviour", "Received", "SecondMx"]
