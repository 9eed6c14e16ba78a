"""Message content for IMAP: envelope, body structure, sections and SEARCH.

The expected BODYSTRUCTURE and section bytes were checked against Dovecot
2.3.19 answering the same messages; where PowerMail answers differently on
purpose, the test says so.
"""

from __future__ import annotations

import datetime
import random
import re

import pytest

from powermail.imap.message import (
    MAX_DEPTH,
    Message,
    nstring,
    partial,
    string,
    to_crlf,
)


def crlf(text: bytes) -> bytes:
    """A test message written with LF, stored with CRLF."""
    return text.replace(b"\n", b"\r\n")


SIMPLE = crlf(
    b"""Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)
From: Terry Gray <gray@cac.washington.edu>
Subject: IMAP4rev1 WG mtg summary and minutes
To: imap@cac.washington.edu
Cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>
Message-Id: <B27397-0100000@cac.washington.edu>
MIME-Version: 1.0
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII

Hello Joe, do you think we can meet at 3:30 tomorrow?
See you.
"""
)

# multipart/mixed: 1 multipart/alternative (1.1 text, 1.2 html), 2 a
# forwarded message/rfc822 that is itself multipart (2.1 text, 2.2 binary).
NESTED = crlf(
    b"""From: "Joe Q. Public" <joe@example.com>
To: Mary <mary@example.net>
Subject: Nested
Date: Tue, 1 Jul 2003 10:52:37 +0200
Message-ID: <1234@local.machine.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

This is the preamble.
--outer
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain; charset=UTF-8
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 plain
--inner
Content-Type: text/html; charset=UTF-8

<p>Caf\xc3\xa9 html</p>
--inner--
--outer
Content-Type: message/rfc822
Content-Description: forwarded
Content-Disposition: attachment; filename="fwd.eml"

From: Alice <alice@example.org>
Subject: Inner
Content-Type: multipart/mixed; boundary="emb"

--emb
Content-Type: text/plain

embedded text
--emb
Content-Type: application/octet-stream; name="x.bin"
Content-Transfer-Encoding: base64

AAECAw==
--emb--
--outer--
epilogue
"""
)

INNER_ENVELOPE = (
    b'(NIL "Inner" (("Alice" NIL "alice" "example.org")) '
    b'(("Alice" NIL "alice" "example.org")) (("Alice" NIL "alice" "example.org")) '
    b"NIL NIL NIL NIL NIL)"
)


# -- helpers ---------------------------------------------------------------


def test_to_crlf_turns_bare_lf_into_crlf_and_keeps_the_rest():
    assert to_crlf(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\nc\rd\r\n"
    assert to_crlf(b"a\r\n\r\n") == b"a\r\n\r\n"
    assert to_crlf(b"") == b""


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (None, b"NIL"),
        (b"", b'""'),
        (b"plain", b'"plain"'),
        (b'say "hi" \\ bye', b'"say \\"hi\\" \\\\ bye"'),
        (b"caf\xc3\xa9", b"{5}\r\ncaf\xc3\xa9"),
        ("café", b"{5}\r\ncaf\xc3\xa9"),
        (b"two\r\nlines", b"{10}\r\ntwo\r\nlines"),
        (b"nul\x00", b"{4}\r\nnul\x00"),
    ],
)
def test_nstring_quotes_when_it_can_and_uses_a_literal_otherwise(value, wire):
    assert nstring(value) == wire


def test_string_is_never_nil():
    assert string(b"NIL") == b'"NIL"'


@pytest.mark.parametrize(
    ("origin", "length", "expected"),
    [
        (None, None, b"0123456789"),
        (0, 4, b"0123"),
        (3, 4, b"3456"),
        (8, 10, b"89"),
        (9, 1, b"9"),
        (10, 5, b""),
        (11, 5, b""),
        (4, 0, b""),
        (2, None, b"23456789"),
    ],
)
def test_partial_follows_rfc3501_origin_and_length(origin, length, expected):
    assert partial(b"0123456789", origin, length) == expected


# -- a simple message ------------------------------------------------------


def test_simple_envelope():
    assert Message(SIMPLE).envelope() == (
        b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" '
        b'"IMAP4rev1 WG mtg summary and minutes" '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'((NIL NIL "imap" "cac.washington.edu")) '
        b'((NIL NIL "minutes" "CNRI.Reston.VA.US")'
        b'("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
        b'NIL NIL "<B27397-0100000@cac.washington.edu>")'
    )


def test_simple_bodystructure_keeps_the_case_of_the_header():
    message = Message(SIMPLE)
    assert message.size == len(SIMPLE)
    assert message.bodystructure() == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7bit" 65 2 NIL NIL NIL NIL)'
    )
    assert message.bodystructure(extended=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7bit" 65 2)'
    )


def test_no_content_type_is_text_plain_us_ascii():
    message = Message(b"Subject: x\r\n\r\nbody\r\n")
    assert message.bodystructure() == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 1 NIL NIL NIL NIL)'
    )


def test_simple_sections():
    message = Message(SIMPLE)
    header, text = SIMPLE.split(b"\r\n\r\n", 1)
    assert message.section(()) == SIMPLE
    assert message.section((), "HEADER") == header + b"\r\n\r\n"
    assert message.section((), "TEXT") == text
    # Part 1 of a non-multipart message is its body.
    assert message.section((1,)) == text
    assert message.section((2,)) == b""
    assert message.section((1, 1)) == b""
    assert message.section((), "MIME") == b""


# -- nested multiparts and message/rfc822 ----------------------------------


def test_nested_bodystructure_matches_dovecot():
    assert Message(NESTED).bodystructure() == (
        b'((("text" "plain" ("charset" "UTF-8") NIL NIL "quoted-printable" 15 0 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "UTF-8") NIL NIL "7bit" 17 0 NIL NIL NIL NIL)'
        b' "alternative" ("boundary" "inner") NIL NIL NIL)'
        b'("message" "rfc822" NIL NIL "forwarded" "7bit" 265 ' + INNER_ENVELOPE + b" "
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 13 0 NIL NIL NIL NIL)'
        b'("application" "octet-stream" ("name" "x.bin") NIL NIL "base64" 8 NIL NIL NIL NIL)'
        b' "mixed" ("boundary" "emb") NIL NIL NIL)'
        b' 14 NIL ("attachment" ("filename" "fwd.eml")) NIL NIL)'
        b' "mixed" ("boundary" "outer") NIL NIL NIL)'
    )


def test_nested_body_has_no_extension_data():
    assert Message(NESTED).bodystructure(extended=False) == (
        b'((("text" "plain" ("charset" "UTF-8") NIL NIL "quoted-printable" 15 0)'
        b'("text" "html" ("charset" "UTF-8") NIL NIL "7bit" 17 0) "alternative")'
        b'("message" "rfc822" NIL NIL "forwarded" "7bit" 265 ' + INNER_ENVELOPE + b" "
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 13 0)'
        b'("application" "octet-stream" ("name" "x.bin") NIL NIL "base64" 8) "mixed")'
        b' 14) "mixed")'
    )


INNER_HEADER = crlf(
    b"""From: Alice <alice@example.org>
Subject: Inner
Content-Type: multipart/mixed; boundary="emb"

"""
)
INNER_TEXT = crlf(
    b"""--emb
Content-Type: text/plain

embedded text
--emb
Content-Type: application/octet-stream; name="x.bin"
Content-Transfer-Encoding: base64

AAECAw==
--emb--
"""
)


@pytest.mark.parametrize(
    ("part", "kind", "expected"),
    [
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046).
        (
            (1,),
            "",
            crlf(
                b"--inner\nContent-Type: text/plain; charset=UTF-8\n"
                b"Content-Transfer-Encoding: quoted-printable\n\nCaf=C3=A9 plain\n"
                b"--inner\nContent-Type: text/html; charset=UTF-8\n\n"
                b"<p>Caf\xc3\xa9 html</p>\n--inner--\n"
            ),
        ),
        ((1,), "MIME", b"Content-Type: multipart/alternative; boundary=inner\r\n\r\n"),
        ((1, 1), "", b"Caf=C3=A9 plain"),
        ((1, 2), "", b"<p>Caf\xc3\xa9 html</p>"),
        ((1, 2), "MIME", b"Content-Type: text/html; charset=UTF-8\r\n\r\n"),
        ((2,), "", INNER_HEADER + INNER_TEXT),
        ((2,), "HEADER", INNER_HEADER),
        ((2,), "TEXT", INNER_TEXT),
        (
            (2,),
            "MIME",
            crlf(
                b"Content-Type: message/rfc822\nContent-Description: forwarded\n"
                b'Content-Disposition: attachment; filename="fwd.eml"\n\n'
            ),
        ),
        ((2,), "HEADER.FIELDS", b"Subject: Inner\r\n\r\n"),
        ((2, 1), "", b"embedded text"),
        ((2, 1), "MIME", b"Content-Type: text/plain\r\n\r\n"),
        ((2, 2), "", b"AAECAw=="),
        ((3,), "", b""),
        ((3,), "MIME", b""),
        ((1, 3), "", b""),
        ((0,), "", b""),
        # HEADER and TEXT exist only for message/rfc822 parts (as Dovecot).
        ((1,), "HEADER", b""),
        ((1, 1), "TEXT", b""),
    ],
)
def test_nested_sections_are_the_exact_original_bytes(part, kind, expected):
    fields = ("subject",) if kind == "HEADER.FIELDS" else ()
    assert Message(NESTED).section(part, kind, fields) == expected


def test_top_text_keeps_preamble_and_epilogue():
    text = Message(NESTED).section((), "TEXT")
    assert text.startswith(b"This is the preamble.\r\n--outer\r\n")
    assert text.endswith(b"--outer--\r\nepilogue\r\n")


def test_message_rfc822_at_the_top():
    data = crlf(
        b"MIME-Version: 1.0\nContent-Type: message/rfc822\n\n"
        b"Subject: inner\nContent-Type: multipart/mixed; boundary=q\n\n"
        b"--q\n\nA\n--q\n\nB\n--q--\n"
    )
    message = Message(data)
    assert message.section((1,), "HEADER") == crlf(
        b"Subject: inner\nContent-Type: multipart/mixed; boundary=q\n\n"
    )
    assert message.section((1, 1)) == b"A"
    assert message.section((1, 2)) == b"B"
    assert message.bodystructure(extended=False) == (
        b'("message" "rfc822" NIL NIL NIL "7bit" 88 '
        b'(NIL "inner" NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0)'
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 1 0) "mixed") 10)'
    )


def test_the_tree_is_parsed_once_and_reused():
    message = Message(NESTED)
    first = message.bodystructure()
    assert message.section((2, 1)) == b"embedded text"
    assert message.bodystructure() == first


# -- HEADER.FIELDS ---------------------------------------------------------

FOLDED = crlf(
    b"""Subject: first line
 second line
X-Tag: 1
NoColon line
\tits continuation
x-tag: 2
\tfolded
From: z@example.com

body
"""
)


def test_header_fields_keeps_folding_and_every_occurrence():
    assert Message(FOLDED).section((), "HEADER.FIELDS", ("X-TAG", "Subject")) == crlf(
        b"Subject: first line\n second line\nX-Tag: 1\nx-tag: 2\n\tfolded\n\n"
    )


def test_header_fields_not_keeps_the_rest_including_lines_without_colon():
    assert Message(FOLDED).section(
        (), "HEADER.FIELDS.NOT", ("x-tag", "SUBJECT")
    ) == crlf(b"NoColon line\n\tits continuation\nFrom: z@example.com\n\n")


def test_header_fields_without_a_match_is_the_blank_line():
    assert Message(FOLDED).section((), "HEADER.FIELDS", ("Nothing",)) == b"\r\n"


def test_header_values_are_unfolded():
    message = Message(FOLDED)
    assert message.header_values("subject") == ["first line second line"]
    assert message.header_values("X-Tag") == ["1", "2\tfolded"]
    assert message.header_values("absent") == []


# -- ENVELOPE --------------------------------------------------------------


def test_envelope_groups_quotes_and_defaults():
    data = crlf(
        b"""From: "Doe, \\"JD\\" \\\\ Jr" <jd@example.com>
Reply-To:
To: undisclosed-recipients:;
Cc: team: a@x.org, B <b@y.org>;, c@z.org (Carl C)
Bcc: <@relay.example,@other.example:route@example.net>
Subject: Caf\xc3\xa9 menu
In-Reply-To: <a@b>
 <c@d>

body
"""
    )
    assert Message(data).envelope() == (
        b"(NIL {10}\r\nCaf\xc3\xa9 menu "
        b'(("Doe, \\"JD\\" \\\\ Jr" NIL "jd" "example.com")) '
        b'(("Doe, \\"JD\\" \\\\ Jr" NIL "jd" "example.com")) '
        b'(("Doe, \\"JD\\" \\\\ Jr" NIL "jd" "example.com")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        b'((NIL NIL "team" NIL)(NIL NIL "a" "x.org")("B" NIL "b" "y.org")'
        b'(NIL NIL NIL NIL)("Carl C" NIL "c" "z.org")) '
        b'((NIL "@relay.example,@other.example" "route" "example.net")) '
        b'"<a@b> <c@d>" NIL)'
    )


def test_envelope_of_a_message_without_headers_is_all_nil():
    assert (
        Message(b"\r\nbody\r\n").envelope()
        == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    )


def test_envelope_address_without_domain_gets_dovecots_placeholder():
    # A NIL host would start RFC 3501 group syntax; Dovecot sends this.
    envelope = Message(b"From: root\r\nTo: Name Only <>\r\n\r\n").envelope()
    assert envelope == (
        b'(NIL NIL ((NIL NIL "root" "MISSING_DOMAIN")) ((NIL NIL "root" "MISSING_DOMAIN")) '
        b'((NIL NIL "root" "MISSING_DOMAIN")) '
        b'(("Name Only" NIL "MISSING_MAILBOX" "MISSING_DOMAIN")) NIL NIL NIL NIL)'
    )


def test_envelope_values_are_raw_not_decoded():
    envelope = Message(
        b"Subject: =?UTF-8?Q?caf=C3=A9?=\r\nFrom: =?UTF-8?Q?Ren=C3=A9?= <r@x.org>\r\n\r\n"
    ).envelope()
    assert envelope == (
        b'(NIL "=?UTF-8?Q?caf=C3=A9?=" (("=?UTF-8?Q?Ren=C3=A9?=" NIL "r" "x.org")) '
        b'(("=?UTF-8?Q?Ren=C3=A9?=" NIL "r" "x.org")) '
        b'(("=?UTF-8?Q?Ren=C3=A9?=" NIL "r" "x.org")) NIL NIL NIL NIL NIL)'
    )


# -- parameters, digest ----------------------------------------------------


def test_rfc2231_continuations_are_joined_as_dovecot_does():
    data = crlf(
        b"""MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="----=_Part_0_1.2"

------=_Part_0_1.2
Content-Type: application/pdf; name*0="quarterly-"; name*1="report.pdf"
Content-Disposition: attachment;
 filename*0*=UTF-8''R%C3%A9sum%C3%A9%20;
 filename*1*=final.pdf
Content-Transfer-Encoding: base64
Content-Language: fr

JVBERi0=
------=_Part_0_1.2--
"""
    )
    assert Message(data).bodystructure() == (
        b'(("application" "pdf" ("name" "quarterly-report.pdf") NIL NIL "base64" 8 NIL '
        b'("attachment" ("filename*" "UTF-8\'\'R%C3%A9sum%C3%A9%20final.pdf")) '
        b'("fr") NIL) "mixed" ("boundary" "----=_Part_0_1.2") NIL NIL NIL)'
    )


def test_unquoted_boundary_may_hold_equals_signs():
    # Dovecot stops this boundary at "="; Outlook writes it unquoted.
    data = crlf(
        b"MIME-Version: 1.0\nContent-Type: multipart/alternative;\n"
        b"\tboundary=----=_NextPart_000_0001; type=text/plain (a comment)\n\n"
        b'------=_NextPart_000_0001\nContent-Type: text/plain; charset="iso-8859-1"\n'
        b"Content-Transfer-Encoding: quoted-printable\n\ncaf=E9\n"
        b"------=_NextPart_000_0001--\n"
    )
    assert Message(data).bodystructure(extended=False) == (
        b'(("text" "plain" ("charset" "iso-8859-1") NIL NIL "quoted-printable" 6 0) '
        b'"alternative")'
    )


def test_digest_parts_default_to_message_rfc822():
    data = crlf(
        b"""MIME-Version: 1.0
Subject: digest
Content-Type: multipart/digest; boundary=d

--d

From: a@example.com
Subject: first

one
--d
Content-Type: text/plain

not a message
--d--
"""
    )
    message = Message(data)
    assert message.bodystructure() == (
        b'(("message" "rfc822" NIL NIL NIL "7bit" 42 '
        b'(NIL "first" ((NIL NIL "a" "example.com")) ((NIL NIL "a" "example.com")) '
        b'((NIL NIL "a" "example.com")) NIL NIL NIL NIL NIL) '
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 0 NIL NIL NIL NIL) 3 '
        b"NIL NIL NIL NIL)"
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 13 0 NIL NIL NIL NIL)'
        b' "digest" ("boundary" "d") NIL NIL NIL)'
    )
    assert message.section((1,), "TEXT") == b"one"
    assert message.section((1, 1)) == b"one"


def test_content_fields_without_mime_version_are_ignored():
    # Dovecot: no MIME-Version and no Content-Type, so no MIME entity.
    data = b"Content-Transfer-Encoding: base64\r\nContent-ID: <x>\r\n\r\nYWJj\r\n"
    assert Message(data).bodystructure(extended=False) == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 6 1)'
    )


# -- malformed input -------------------------------------------------------


def test_no_blank_line_makes_everything_header():
    data = b"Subject: no blank line\r\nFrom: a@b"
    message = Message(data)
    assert message.section((), "HEADER") == data
    assert message.section((), "TEXT") == b""
    assert message.section((), "HEADER.FIELDS", ("from",)) == b"From: a@b\r\n\r\n"
    assert message.bodystructure() == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'
    )
    assert message.envelope() == (
        b'(NIL "no blank line" ((NIL NIL "a" "b")) ((NIL NIL "a" "b")) '
        b'((NIL NIL "a" "b")) NIL NIL NIL NIL NIL)'
    )


def test_missing_closing_boundary_runs_to_the_end():
    data = crlf(b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nunterminated\n")
    message = Message(data)
    assert message.section((1,)) == b"unterminated\r\n"
    assert message.bodystructure(extended=False) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 1) "mixed")'
    )


def test_multipart_without_boundary_has_one_empty_part():
    data = crlf(b"Content-Type: multipart/mixed\n\n--b\n\ntext\n--b--\n")
    message = Message(data)
    assert message.bodystructure() == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'
        b' "mixed" NIL NIL NIL NIL)'
    )
    assert message.section((1,)) == b""


def test_part_headers_cut_short_by_a_boundary():
    data = crlf(
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\n\n\n"
        b"--b\nContent-Type: message/rfc822\n\n--b\nContent-Type: text/plain\n\n--b--"
    )
    message = Message(data)
    assert message.bodystructure(extended=False) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 2 1)'
        b'("message" "rfc822" NIL NIL NIL "7bit" 0 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) 0)'
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) "mixed")'
    )
    # The CRLF before "--b--" is the delimiter's, not the header's.
    assert message.section((3,), "MIME") == b"Content-Type: text/plain\r\n"


def test_garbage_headers_do_not_stop_the_header():
    data = b"Garbage without colon\r\n\xff\xfe: x\r\nSubject: ok\r\n\r\nbody\r\n"
    message = Message(data)
    assert message.header_values("subject") == ["ok"]
    assert message.envelope() == b'(NIL "ok" NIL NIL NIL NIL NIL NIL NIL NIL)'


def test_nesting_is_capped_and_the_deepest_part_becomes_opaque():
    depth = MAX_DEPTH + 10
    data = b"".join(
        b'Content-Type: multipart/mixed; boundary="x%d-y"\r\n\r\n--x%d-y\r\n' % (i, i)
        for i in range(depth)
    )
    data += b"Content-Type: text/plain\r\n\r\ninnermost"
    data += b"".join(b"\r\n--x%d-y--" % i for i in reversed(range(depth))) + b"\r\n"
    structure = Message(data).bodystructure(extended=False)
    assert structure.startswith(
        b"(" * (MAX_DEPTH + 1) + b'"application" "octet-stream"'
    )
    assert structure.count(b'"mixed"') == MAX_DEPTH
    assert Message(data).section((1,) * MAX_DEPTH).startswith(b"--x20-y\r\n")


def test_deep_message_rfc822_chain_is_capped():
    data = (
        b"Content-Type: message/rfc822\r\n\r\n" * (MAX_DEPTH + 5)
        + b"Subject: x\r\n\r\nx"
    )
    structure = Message(data).bodystructure()
    assert structure.count(b'"message" "rfc822"') == MAX_DEPTH
    assert b'"application" "octet-stream"' in structure


_WIRE_TOKEN = re.compile(
    rb'\(|\)| |NIL|[0-9]+|"(?:[^"\\\r\n]|\\["\\])*"|\{([0-9]+)\}\r\n'
)


def _assert_wire_syntax(value: bytes) -> None:
    """Balanced parentheses of NIL, numbers, quoted strings and literals."""
    pos = depth = 0
    while pos < len(value):
        m = _WIRE_TOKEN.match(value, pos)
        assert m, value[pos : pos + 40]
        depth += {b"(": 1, b")": -1}.get(m.group(), 0)
        assert depth >= 0
        pos = m.end() + (int(m.group(1)) if m.group(1) else 0)
    assert pos == len(value)
    assert depth == 0


def test_mangled_messages_never_raise():
    """Random cuts and insertions into real messages: answers stay sane."""
    rnd = random.Random(3501)
    seeds = [SIMPLE, NESTED, FOLDED]
    pieces = [
        b"\r\n",
        b"--",
        b"--outer",
        b"--inner--",
        b":",
        b'"',
        b"(",
        b"=?",
        b"\xff",
    ]
    pieces += [b"<", b";", b"\\", b"\r\n\r\n", b"Content-Type: message/rfc822\r\n"]
    for _ in range(300):
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 6)):
            pos = rnd.randint(0, len(data))
            if rnd.random() < 0.6:
                data[pos:pos] = rnd.choice(pieces)
            else:
                del data[pos : pos + rnd.randint(1, 30)]
        data = bytes(data)
        message = Message(data)
        _assert_wire_syntax(message.envelope())
        _assert_wire_syntax(message.bodystructure())
        _assert_wire_syntax(message.bodystructure(extended=False))
        for part in [(), (1,), (2,), (1, 1), (1, 2), (2, 1), (2, 2), (3,)]:
            for kind in ("", "HEADER", "TEXT", "MIME"):
                assert message.section(part, kind) in data
            message.section(part, "HEADER.FIELDS.NOT", ("from",))
        message.text_contains("é")
        message.sent_date()


def test_empty_message():
    message = Message(b"")
    assert message.size == 0
    assert message.section(()) == b""
    assert message.section((1,)) == b""
    assert message.envelope() == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert message.bodystructure(extended=False) == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
    )


# -- SEARCH ----------------------------------------------------------------

SEARCHABLE = crlf(
    b"""From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <jm@example.de>
To: "Smith, John" <john@example.com>
Subject: =?UTF-8?B?R3LDvMOfZQ==?= aus =?ISO-8859-1?Q?M=FCnchen?=
Date: Mon, 1 Jan 2024 23:30:00 -0500
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=s

--s
Content-Type: text/plain; charset=ISO-8859-1
Content-Transfer-Encoding: base64

TGUgY2Fm6SBlc3QgY2hhdWQu
--s
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<p>Sch=C3=B6ne Gr=C3=BC=C3=9Fe aus dem =
B=C3=BCro</p>
--s
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

c2VjcmV0IHdvcmQ=
--s
Content-Type: message/rfc822

Subject: inner

inner body has a needle
--s--
"""
)


@pytest.mark.parametrize(
    ("name", "needle", "found"),
    [
        ("subject", "Grüße", True),
        ("subject", "GRÜSSE", True),  # casefolded: ß is ss
        ("subject", "grüße aus münchen", True),
        ("subject", "münchen", True),
        ("SUBJECT", "R3LDvMOfZQ", False),
        ("from", "Jürgen Müller", True),
        ("from", "jm@example.de", True),
        ("to", "smith, john", True),
        ("to", "Smith, John <john@", True),  # the decoded display form
        ("to", "", True),
        ("cc", "", False),
        ("", "münchen", True),
        ("", "nowhere", False),
    ],
)
def test_header_contains_decodes_encoded_words(name, needle, found):
    assert Message(SEARCHABLE).header_contains(name, needle) is found


def test_encoded_word_split_inside_a_character_still_matches():
    # "é" is C3 A9 in UTF-8, split across two base64 encoded-words.
    data = b"Subject: =?UTF-8?B?Y2Fmww==?= =?UTF-8?B?qQ==?=\r\n\r\n"
    assert Message(data).header_contains("subject", "café")


def test_raw_8bit_headers_are_read_as_utf8():
    data = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nX-Bad: \xff\xfe\r\n\r\n"
    message = Message(data)
    assert message.header_contains("subject", "grüße")
    assert not message.header_contains("x-bad", "grüße")


@pytest.mark.parametrize(
    ("needle", "found"),
    [
        ("café", True),  # base64, ISO-8859-1
        ("CAFÉ EST", True),
        ("grüße aus dem büro", True),  # quoted-printable, UTF-8, soft break
        ("needle", True),  # inside the attached message
        ("secret", False),  # in an application/octet-stream part
        ("TGUgY2Fm", False),  # the encoded form is not the text
        ("münchen", False),  # only in the header
    ],
)
def test_body_contains_undoes_transfer_encoding_and_charset(needle, found):
    assert Message(SEARCHABLE).body_contains(needle) is found


def test_unknown_charset_reads_as_utf8():
    data = crlf(b"Content-Type: text/plain; charset=x-unheard-of\n\nna\xc3\xafve\n")
    assert Message(data).body_contains("naïve")


def test_text_contains_header_or_body():
    message = Message(SEARCHABLE)
    assert message.text_contains("münchen")
    assert message.text_contains("café")
    assert not message.text_contains("absent everywhere")


def test_sent_date_keeps_the_header_time_zone():
    assert Message(SEARCHABLE).sent_date() == datetime.date(2024, 1, 1)
    assert Message(b"Date: garbage\r\n\r\n").sent_date() is None
    assert Message(b"Subject: none\r\n\r\n").sent_date() is None


@pytest.mark.parametrize(
    "header",
    [
        b"Subject: one\r\n\r\n",
        b"subject: a\r\n b\r\nX: y\r\nSUBJECT : c\r\n\r\n",
        b"X: y\r\n\tSubject: not a field\r\nSubjectx: no\r\n\r\n",
        b"From: a\nSubject: lf\n folded\n\nbody",
        b"Subject:",
        b"\r\nSubject: body, not header\r\n",
    ],
)
def test_fields_found_by_name_are_those_the_full_split_finds(header):
    """The fast path of SEARCH SUBJECT sees exactly the fields HEADER does."""
    from powermail.imap.message import _blank_line_end, _named_fields, _parse_fields

    end = _blank_line_end(header, 0, len(header))
    end = len(header) if end < 0 else end
    expected = [f for f in _parse_fields(header, 0, end) if f[0] == "subject"]
    assert _named_fields(header, end, "subject") == expected
