"""A small authoritative DNS server on loopback, for tests that need real DNS.

Run it as ``python tests/dns_server.py --port P --zone ZONE.json``; it
answers over UDP and TCP on 127.0.0.1, prints ``READY <port>`` once it
listens (port 0 picks a free one) and exits on SIGTERM.  Tests start it with
``start_dns_server(zone)``.  The zone is a JSON object of names::

    {"example.net": {"MX": [[10, "mx1.example.net"], [20, "mx2.example.net"]]},
     "mx1.example.net": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
     "nullmx.test": {"MX": [[0, "."]]},
     "empty.test": {},
     "www.example.net": {"CNAME": "mx1.example.net"},
     "txt.test": {"TXT": ["v=spf1 -all"]},
     "broken.test": {"SERVFAIL": true},
     "slow.test": {"TIMEOUT": true}}

A name not in the zone is NXDOMAIN; a name without records of the asked
type is an empty NOERROR answer.  ``SERVFAIL`` answers every question about
the name with SERVFAIL; ``TIMEOUT`` never answers.  Names compare without
case and without a trailing dot.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol
from twisted.names import common, dns, server
from twisted.names.error import DNSNameError, DNSServerError

__all__ = ["ZoneAuthority", "load_zone", "start_dns_server", "stop_dns_server"]

_TTL = 60
_FLAGS = ("SERVFAIL", "TIMEOUT")
_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "CNAME": dns.CNAME}
_TYPES.update({"TXT": dns.TXT, "NS": dns.NS})
_MAX_CNAME_CHAIN = 8
_UDP_LIMIT = 512


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower()


def _record(kind: str, value: Any) -> dns.IEncodable:
    if kind == "A":
        return dns.Record_A(value, ttl=_TTL)
    if kind == "AAAA":
        return dns.Record_AAAA(value, ttl=_TTL)
    if kind == "MX":
        preference, exchange = value
        # "." is the root name, the exchange of a null MX (RFC 7505).
        return dns.Record_MX(int(preference), _key(exchange).encode(), ttl=_TTL)
    if kind == "CNAME":
        return dns.Record_CNAME(_key(value).encode(), ttl=_TTL)
    if kind == "NS":
        return dns.Record_NS(_key(value).encode(), ttl=_TTL)
    if isinstance(value, str):
        value = [value]
    return dns.Record_TXT(*(part.encode() for part in value), ttl=_TTL)


def load_zone(zone: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Check ``zone`` and turn its values into twisted.names records.

    Returns ``{name: {"records": {type: [record]}, "SERVFAIL": bool,
    "TIMEOUT": bool}}``; ValueError names the first entry it cannot use.
    """
    loaded = {}
    for name, entry in zone.items():
        if not isinstance(entry, dict):
            raise ValueError(f"zone entry {name!r} must be an object")
        records: dict[int, list[dns.IEncodable]] = {}
        flags = {flag: bool(entry.get(flag, False)) for flag in _FLAGS}
        for kind, values in entry.items():
            if kind in _FLAGS:
                continue
            if kind not in _TYPES:
                raise ValueError(f"zone entry {name!r}: unknown record type {kind!r}")
            if kind == "CNAME" and isinstance(values, str):
                values = [values]
            try:
                records[_TYPES[kind]] = [_record(kind, value) for value in values]
            except (TypeError, ValueError, OSError) as exc:
                raise ValueError(f"zone entry {name!r} {kind}: {exc}") from None
        loaded[_key(name)] = {"records": records, **flags}
    return loaded


class ZoneAuthority(common.ResolverBase):
    """An IResolver that answers from an in-memory zone (see the module doc).

    It works without a network too: handed straight to a resolver user it
    answers synchronously (except for ``TIMEOUT`` names, which never fire).
    """

    def __init__(self, zone: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self._zone = load_zone(zone)

    def _lookup(self, name, cls, type_, timeout):
        entry = self._zone.get(_key(name))
        if entry is None:
            return defer.fail(DNSNameError(f"{name} not in zone"))
        if entry["TIMEOUT"]:
            return defer.Deferred()
        if entry["SERVFAIL"]:
            return defer.fail(DNSServerError(f"{name} is set to fail"))
        return defer.succeed((self._answers(_key(name), type_), [], []))

    def _answers(self, name: str, type_: int) -> list[dns.RRHeader]:
        answers = []
        for _ in range(_MAX_CNAME_CHAIN):
            entry = self._zone.get(name)
            if entry is None:
                break
            records = entry["records"]
            if dns.CNAME in records and type_ != dns.CNAME:
                alias = records[dns.CNAME][0]
                answers.append(self._header(name, dns.CNAME, alias))
                name = _key(alias.name.name)
                continue
            for kind, payloads in records.items():
                if type_ in (kind, dns.ALL_RECORDS):
                    answers.extend(self._header(name, kind, p) for p in payloads)
            break
        return answers

    @staticmethod
    def _header(name: str, kind: int, payload: dns.IEncodable) -> dns.RRHeader:
        return dns.RRHeader(name, kind, dns.IN, _TTL, payload, auth=True)


class _ServerFactory(server.DNSServerFactory):
    """The twisted.names server with two corrections a real server makes.

    DNSServerError is answered SERVFAIL (the base class says NXDOMAIN), and
    a UDP answer longer than 512 octets (RFC 1035 section 4.2.1; EDNS is not
    offered) goes out truncated, so the client asks again over TCP.
    """

    def sendReply(self, protocol, message, address):  # noqa: N802
        if address is not None and len(message.toStr()) > _UDP_LIMIT:
            message.answers, message.authority, message.additional = [], [], []
            message.trunc = True
        super().sendReply(protocol, message, address)

    def gotResolverError(self, failure, protocol, message, address):  # noqa: N802
        if failure.check(DNSServerError):
            reply = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, reply, address)
            return
        super().gotResolverError(failure, protocol, message, address)


class _StopOnEOF(Protocol):
    """Stops the reactor when stdin closes: the test that started us is gone."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if self._reactor.running:
            self._reactor.stop()


def listen(reactor: Any, authority: ZoneAuthority, port: int, host: str) -> int:
    """Listen on UDP and TCP ``port`` of ``host``; return the port used."""
    factory = _ServerFactory(authorities=[authority])
    protocol = dns.DNSDatagramProtocol(factory)
    for _ in range(20):
        udp = reactor.listenUDP(port, protocol, interface=host)
        chosen = udp.getHost().port
        try:
            reactor.listenTCP(chosen, factory, interface=host)
        except CannotListenError:
            # Only a free port picked for UDP can be busy for TCP: pick again.
            udp.stopListening()
            if port:
                raise
            continue
        return chosen
    raise RuntimeError("no port free for both UDP and TCP")


def main(argv: list[str] | None = None) -> None:
    """Run the server until SIGTERM (or stdin's end with --stop-on-stdin-eof)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--zone", required=True, help="zone JSON file, - for stdin")
    parser.add_argument("--stop-on-stdin-eof", action="store_true")
    args = parser.parse_args(argv)

    text = sys.stdin.read() if args.zone == "-" else Path(args.zone).read_text("utf-8")
    authority = ZoneAuthority(json.loads(text))

    from twisted.internet import reactor

    port = listen(reactor, authority, args.port, args.host)
    if args.stop_on_stdin_eof:
        from twisted.internet.stdio import StandardIO

        StandardIO(_StopOnEOF(reactor), stdout=os.open(os.devnull, os.O_WRONLY))
    print(f"READY {port}", flush=True)
    reactor.run()


def start_dns_server(
    zone: dict[str, dict[str, Any]], port: int = 0, *, timeout: float = 15.0
) -> tuple[subprocess.Popen, int]:
    """Run this server in a subprocess with ``zone``; return it and its port.

    The server also stops when the test process dies, since it watches its
    stdin; stop it with ``stop_dns_server``.
    """
    load_zone(zone)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", encoding="utf-8", delete=False
    ) as file:
        json.dump(zone, file)
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--port",
                str(port),
                "--zone",
                file.name,
                "--stop-on-stdin-eof",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        line = _read_line(process, timeout)
    finally:
        os.unlink(file.name)
    if not line.startswith(b"READY "):
        stop_dns_server(process)
        raise RuntimeError(f"DNS server did not start: {line!r}")
    return process, int(line.split()[1])


def _read_line(process: subprocess.Popen, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if not ready:
            break
        chunk = os.read(process.stdout.fileno(), 1)
        if not chunk:
            break
        data += chunk
    return data.strip()


def stop_dns_server(process: subprocess.Popen) -> None:
    """SIGTERM the server and wait for it; SIGKILL if it does not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


if __name__ == "__main__":
    main()
