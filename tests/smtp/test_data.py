"""BodyReader: end of data, dot-unstuffing and line checks, fed in any pieces."""

from __future__ import annotations

import pytest

from powermail.smtp.data import BodyReader


def read(pieces, **limits):
    out = []
    reader = BodyReader(
        out.append,
        max_size=limits.get("size", 10_000),
        max_line=limits.get("line", 100),
    )
    for index, piece in enumerate(pieces):
        rest = reader.feed(piece)
        if rest is not None:
            return b"".join(out), reader.problem, rest + b"".join(pieces[index + 1 :])
    return b"".join(out), reader.problem, None


def test_unstuffs_and_stops_at_the_dot_line():
    assert read([b"a\r\n..b\r\n.c\r\n.\r\nNOOP\r\n"]) == (
        b"a\r\n.b\r\nc\r\n",
        None,
        b"NOOP\r\n",
    )


def test_empty_message():
    assert read([b".\r\n"]) == (b"", None, b"")


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_any_split_gives_the_same_result(size):
    data = b"Subject: s\r\n\r\n.x\r\nline\r\n..\r\n.\r\nQUIT\r\n"
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    assert read(pieces) == (b"Subject: s\r\n\r\nx\r\nline\r\n.\r\n", None, b"QUIT\r\n")


@pytest.mark.parametrize("bad", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"\n\r\n"])
def test_bare_newlines_are_a_problem(bad):
    assert read([bad + b".\r\n"])[1] == "newline"


def test_long_line_is_noted_and_the_end_still_found():
    body, problem, rest = read([b"x" * 150, b"y" * 150, b"\r\n.\r\n"])
    assert (body, problem, rest) == (b"", "line", b"")


def test_oversized_message_is_read_to_its_end():
    body, problem, rest = read(
        [b"x" * 50 + b"\r\n"] * 10 + [b".\r\nNOOP\r\n"], size=200
    )
    assert problem == "size" and rest == b"NOOP\r\n"
