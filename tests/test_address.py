"""Address parsing per RFC 5321 and RFC 6531."""

from __future__ import annotations

import pytest

from powermail.address import Address, AddressError, parse_address, parse_path


def test_plain_and_normalised():
    address = parse_path("<Alice@Example.TEST>", allow_utf8=False, allow_null=False)
    assert address == Address("Alice", "example.test")
    assert address.key == "alice@example.test"
    assert str(address) == "Alice@example.test"


def test_null_path_and_bare_postmaster():
    assert parse_path("<>", allow_utf8=False, allow_null=True) is None
    assert parse_address("PostMaster") == Address("postmaster", None)


def test_utf8_local_part_and_domain():
    address = parse_address("jösé@exämple.test")
    assert address.domain == "xn--exmple-cua.test"
    assert address.is_utf8
    with pytest.raises(AddressError):
        parse_address("jösé@example.test", allow_utf8=False)


def test_quoted_local_part_keeps_its_meaning():
    address = parse_address('"john doe"@example.test')
    assert address.local == "john doe"
    assert str(address) == '"john doe"@example.test'
    assert parse_address('"alice"@example.test').key == "alice@example.test"


def test_literals():
    assert parse_address("a@[127.0.0.1]") == Address("a", "[127.0.0.1]", literal=True)
    assert parse_address("a@[IPv6:0::1]").domain == "[IPv6:::1]"
    with pytest.raises(AddressError):
        parse_address("a@[300.1.1.1]")


def test_source_route_is_dropped():
    assert parse_path(
        "<@a.test,@b.test:x@c.test>", allow_utf8=False, allow_null=False
    ) == (Address("x", "c.test"))


@pytest.mark.parametrize(
    ("text", "routing"),
    [
        ("a@b@c.test", True),
        ("a@c.test@", True),
        ("a..b@c.test", False),
        (".a@c.test", False),
        ("a@-c.test", False),
        ("a@c.test.", False),
        ("a@", True),
        ('"unterminated@c.test', False),
        ("x" * 65 + "@c.test", False),
    ],
)
def test_invalid_addresses(text, routing):
    with pytest.raises(AddressError) as info:
        parse_address(text)
    assert info.value.routing is routing
