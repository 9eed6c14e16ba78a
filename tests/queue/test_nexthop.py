"""Next hops: Postfix-style parsing, and resolution against a real DNS server.

A reactor runs once per process and pytest-twisted is not installed, so the
resolution tests run NextHopResolver in one child process (this file, run as
a script) that makes every lookup of the module against tests/dns_server.py
and prints the outcomes as JSON; each test then checks its own lookup.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from powermail.queue.nexthop import (
    NextHop,
    NextHopError,
    NextHopResolver,
    Target,
    make_resolver,
    parse_next_hop,
)

REPO = Path(__file__).resolve().parents[2]

# -- parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hop"),
    [
        ("mail.example.com", NextHop("mail.example.com", 25, mx=True)),
        ("Mail.Example.COM", NextHop("mail.example.com", 25, mx=True)),
        ("mail.example.com.", NextHop("mail.example.com", 25, mx=True)),
        ("mail.example.com:2525", NextHop("mail.example.com", 2525, mx=True)),
        ("[mail.example.com]", NextHop("mail.example.com", 25, mx=False)),
        ("[mail.example.com]:2525", NextHop("mail.example.com", 2525, mx=False)),
        ("localhost", NextHop("localhost", 25, mx=True)),
        ("exämple.test", NextHop("xn--exmple-cua.test", 25, mx=True)),
        ("192.0.2.1", NextHop("192.0.2.1", 25, mx=False)),
        ("192.0.2.1:587", NextHop("192.0.2.1", 587, mx=False)),
        ("[192.0.2.1]", NextHop("192.0.2.1", 25, mx=False)),
        ("[192.0.2.1]:25", NextHop("192.0.2.1", 25, mx=False)),
        ("[2001:db8::1]:2525", NextHop("2001:db8::1", 2525, mx=False)),
        ("[2001:DB8:0::1]", NextHop("2001:db8::1", 25, mx=False)),
        ("[IPv6:2001:db8::1]:26", NextHop("2001:db8::1", 26, mx=False)),
        ("2001:db8::1", NextHop("2001:db8::1", 25, mx=False)),
        ("[127.0.0.1]:65535", NextHop("127.0.0.1", 65535, mx=False)),
    ],
)
def test_parse_next_hop(text, hop):
    assert parse_next_hop(text) == hop


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (" mail.example.com", "white space"),
        ("mail.example.com ", "white space"),
        ("mail example.com", "white space"),
        ("mail.example.com:", "bad port"),
        ("mail.example.com:0", "bad port"),
        ("mail.example.com:65536", "bad port"),
        ("mail.example.com:25a", "bad port"),
        ("mail.example.com:+25", "bad port"),
        ("mail.example.com:١٢", "bad port"),
        ("[mail.example.com]:", "bad port"),
        ("[mail.example.com]25", "text after"),
        ("[mail.example.com", "without"),
        ("[]", "nothing between"),
        (":25", "no host"),
        ("2001:db8::1:2525:x", "brackets"),
        ("[fe80::1%eth0]", "scoped"),
        ("[IPv6:192.0.2.1]", "bad IPv6"),
        ("192.0.2.256", "not a valid IP"),
        ("192.0.2", "not a valid IP"),
        ("mail_relay.example.com", "bad host name"),
        ("-mail.example.com", "bad host name"),
        ("mail..example.com", "bad host name"),
        ("[mail.exa$mple.com]", "bad host name"),
    ],
)
def test_parse_next_hop_refuses(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_next_hop(text)


@pytest.mark.parametrize(
    "text",
    ["mail.example.com", "mail.example.com:2525", "[mail.example.com]:2525"]
    + ["[192.0.2.1]", "[2001:db8::1]:2525"],
)
def test_next_hop_prints_as_it_parses(text):
    assert str(parse_next_hop(text)) == text


# -- resolution ---------------------------------------------------------------

ZONE = {
    "example.net": {
        "MX": [[20, "mx2.example.net"], [10, "mx1.example.net"]],
        "A": ["127.0.0.9"],
    },
    "mx1.example.net": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "mx2.example.net": {"A": ["127.0.0.2"]},
    "mx3.example.net": {"A": ["127.0.0.3"]},
    "plain.test": {"A": ["127.0.0.4"], "AAAA": ["::4"]},
    "nullmx.test": {"MX": [[0, "."]]},
    "empty.test": {},
    "equal.test": {
        "MX": [[10, "mx1.example.net"], [10, "mx2.example.net"], [5, "mx3.example.net"]]
    },
    "halfdead.test": {"MX": [[5, "gone.test"], [10, "mx2.example.net"]]},
    "deadmx.test": {"MX": [[10, "gone.test"]]},
    "tempmx.test": {"MX": [[10, "broken.test"]]},
    "broken.test": {"SERVFAIL": True},
    "slow.test": {"TIMEOUT": True},
    "big.test": {"MX": [[i, f"mx{i:02}.{'l' * 50}.big.test"] for i in range(20)]},
    **{f"mx{i:02}.{'l' * 50}.big.test": {"A": [f"127.0.1.{i}"]} for i in range(20)},
}

# name -> (next hop, use the DNS server?, resolver timeout)
LOOKUPS = {
    "mx": ("example.net", True, None),
    "mx_port": ("example.net:2526", True, None),
    "equal": ("equal.test", True, None),
    "no_mx": ("plain.test", True, None),
    "null_mx": ("nullmx.test", True, None),
    "nxdomain": ("nowhere.test", True, None),
    "empty": ("empty.test", True, None),
    "bracket": ("[example.net]:2525", True, None),
    "bracket_nxdomain": ("[gone.test]", True, None),
    "halfdead": ("halfdead.test", True, None),
    "deadmx": ("deadmx.test", True, None),
    "tempmx": ("tempmx.test", True, None),
    "servfail": ("broken.test", True, None),
    "timeout": ("slow.test", True, [0.5]),
    "tcp": ("big.test", True, None),
    # No DNS server behind these: any query would time out.
    "ipv4": ("[192.0.2.1]:2525", False, [0.5]),
    "ipv4_bare": ("192.0.2.1", False, [0.5]),
    "ipv6": ("[2001:db8::1]", False, [0.5]),
}


def _run_lookups() -> None:
    """Child process: make the lookups of stdin's request, print JSON."""
    from twisted.internet import defer, task

    request = json.load(sys.stdin)

    async def main(reactor) -> None:
        outcomes = {}
        for name, (text, use_dns, timeout) in request["lookups"].items():
            port = request["dns_port"] if use_dns else request["dead_port"]
            resolver = NextHopResolver(
                make_resolver([("127.0.0.1", port)], reactor=reactor),
                timeout=timeout,
                rng=random.Random(7),
            )
            try:
                targets = await resolver.targets(parse_next_hop(text))
            except NextHopError as error:
                outcomes[name] = {
                    "error": error.message,
                    "permanent": error.permanent,
                    "status": error.status,
                }
            else:
                outcomes[name] = {"targets": [astuple(t) for t in targets]}
        print(json.dumps(outcomes))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def _unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes():
    """Every lookup of LOOKUPS, made once by one child process."""
    from dns_server import start_dns_server, stop_dns_server

    server, port = start_dns_server(ZONE)
    try:
        request = {"dns_port": port, "dead_port": _unused_udp_port()}
        request["lookups"] = LOOKUPS
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
        )
        child = subprocess.run(
            [sys.executable, __file__],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        stop_dns_server(server)
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    return {
        name: (
            [Target(*t) for t in result["targets"]]
            if "targets" in result
            else NextHopError(
                result["error"], result["permanent"], status=result["status"]
            )
        )
        for name, result in results.items()
    }


def error(outcome) -> NextHopError:
    assert isinstance(outcome, NextHopError), outcome
    return outcome


def test_mx_hosts_in_preference_order_each_with_a_then_aaaa(outcomes):
    assert outcomes["mx"] == [
        Target("127.0.0.1", 25, "mx1.example.net", 10),
        Target("::1", 25, "mx1.example.net", 10),
        Target("127.0.0.2", 25, "mx2.example.net", 20),
    ]


def test_mx_hop_with_a_port(outcomes):
    assert [(t.hostname, t.port) for t in outcomes["mx_port"]] == [
        ("mx1.example.net", 2526),
        ("mx1.example.net", 2526),
        ("mx2.example.net", 2526),
    ]


def test_equal_preferences_come_after_the_better_one(outcomes):
    targets = outcomes["equal"]

    assert targets[0] == Target("127.0.0.3", 25, "mx3.example.net", 5)
    assert {t.hostname for t in targets[1:]} == {"mx1.example.net", "mx2.example.net"}
    assert {t.preference for t in targets[1:]} == {10}


def test_domain_without_mx_is_its_own_mx(outcomes):
    """RFC 5321 section 5.1: the implicit MX, preference 0."""
    assert outcomes["no_mx"] == [
        Target("127.0.0.4", 25, "plain.test", 0),
        Target("::4", 25, "plain.test", 0),
    ]


def test_null_mx_is_permanent(outcomes):
    failure = error(outcomes["null_mx"])

    assert failure.permanent
    assert failure.status == "5.1.10"
    assert "null MX" in failure.message


def test_nxdomain_is_permanent(outcomes):
    failure = error(outcomes["nxdomain"])

    assert failure.permanent
    assert failure.status == "5.1.2"
    assert "nowhere.test does not exist" in failure.message


def test_domain_without_mx_or_address_is_permanent(outcomes):
    failure = error(outcomes["empty"])

    assert failure.permanent
    assert "no A or AAAA" in failure.message


def test_bracketed_name_uses_its_address_not_its_mx(outcomes):
    assert outcomes["bracket"] == [Target("127.0.0.9", 2525, "example.net", 0)]


def test_bracketed_name_that_does_not_exist(outcomes):
    assert error(outcomes["bracket_nxdomain"]).permanent


def test_mx_host_that_does_not_exist_is_skipped(outcomes):
    assert outcomes["halfdead"] == [Target("127.0.0.2", 25, "mx2.example.net", 10)]


def test_no_mx_host_resolves_is_permanent(outcomes):
    failure = error(outcomes["deadmx"])

    assert failure.permanent
    assert "gone.test" in failure.message


def test_mx_host_lookup_servfail_is_temporary(outcomes):
    failure = error(outcomes["tempmx"])

    assert not failure.permanent
    assert failure.status.startswith("4.")


def test_servfail_is_temporary(outcomes):
    failure = error(outcomes["servfail"])

    assert not failure.permanent
    assert "SERVFAIL" in failure.message


def test_timeout_is_temporary(outcomes):
    failure = error(outcomes["timeout"])

    assert not failure.permanent
    assert "timed out" in failure.message


def test_long_answer_is_fetched_over_tcp(outcomes):
    """Twenty MX records overflow 512 octets: truncated UDP, then TCP."""
    targets = outcomes["tcp"]

    assert [t.preference for t in targets] == list(range(20))
    assert targets[0].address == "127.0.1.0"


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("ipv4", Target("192.0.2.1", 2525, "192.0.2.1", 0)),
        ("ipv4_bare", Target("192.0.2.1", 25, "192.0.2.1", 0)),
        ("ipv6", Target("2001:db8::1", 25, "2001:db8::1", 0)),
    ],
)
def test_ip_hop_needs_no_dns(outcomes, name, target):
    """The resolver points at a port nobody answers on: no query was made."""
    assert outcomes[name] == [target]


def test_make_resolver_refuses_a_server_name():
    with pytest.raises(ValueError, match="not an IP address"):
        make_resolver([("dns.example.net", 53)], reactor=Clock())


def test_make_resolver_with_servers_reads_no_resolv_conf():
    resolver = make_resolver([("127.0.0.1", 5353)], reactor=Clock())

    assert resolver.resolv is None
    assert resolver.servers == [("127.0.0.1", 5353)]
    assert resolver.dynServers == ()


if __name__ == "__main__":
    _run_lookups()
