"""Delivery status notifications as a mail client and a bounce parser read them.

Every report is parsed back with the email package's default policy; the
parts the package does not take apart (the RFC 6533 types) are read from
the raw octets between the MIME boundaries.
"""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import pytest

from powermail.queue.dsn import FailedRecipient, build_dsn

ARRIVAL = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
NOW = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
ORIGINAL_HEADERS = (
    b"Received: from client.example.test ([192.0.2.7])\r\n"
    b"\tby mx.example.test (PowerMail) with ESMTPS id Q1; Wed, 1 May 2024\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Message-ID: <abc@example.test>\r\n"
)
ORIGINAL = ORIGINAL_HEADERS + b"\r\nThe figures are attached.\r\n"

FAILED = FailedRecipient(
    recipient="bob@example.net",
    action="failed",
    status="5.1.1",
    diagnostic="550 5.1.1 no such user",
    remote_mta="mx1.example.net",
    last_attempt=NOW,
    will_retry_until=None,
)
DELAYED = FailedRecipient(
    recipient="carol@example.org",
    action="delayed",
    status="4.4.1",
    diagnostic="451 4.4.1 try again later",
    remote_mta="mx.example.org",
    last_attempt=NOW,
    will_retry_until=NOW + timedelta(days=5),
)


def build(**overrides) -> bytes:
    arguments = {
        "reporting_mta": "mx.example.test",
        "sender": "alice@example.test",
        "msg_id": "0123456789ABCDEFGH",
        "arrival": ARRIVAL,
        "recipients": [FAILED],
        "original": ORIGINAL,
        "now": NOW,
    }
    arguments.update(overrides)
    return build_dsn(**arguments)


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def raw_bodies(raw: bytes) -> list[bytes]:
    """The octets of each top-level part's body, exactly as sent."""
    boundary = parse(raw).get_boundary().encode()
    chunks = raw.split(b"\r\n--" + boundary)
    assert chunks[-1].startswith(b"--")
    bodies = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        _, _, body = chunk[2:].partition(b"\r\n\r\n")
        bodies.append(body)
    return bodies


def raw_status_blocks(raw: bytes) -> list[dict[str, str]]:
    """The delivery-status fields read from the octets, one dict a block."""
    body = raw_bodies(raw)[1].decode("utf-8")
    blocks = []
    for block in body.rstrip("\r\n").split("\r\n\r\n"):
        lines = block.split("\r\n")
        blocks.append(dict(line.split(": ", 1) for line in lines))
    return blocks


def status_blocks(raw: bytes) -> list[email.message.EmailMessage]:
    part = parse(raw).get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return part.get_payload()


def test_report_headers_and_structure():
    """multipart/report of notification, delivery-status and original headers."""
    message = parse(build())

    sender = message["From"].addresses[0]
    assert sender.display_name == "Mail Delivery System"
    assert sender.addr_spec == "MAILER-DAEMON@mx.example.test"
    assert message["To"].addresses[0].addr_spec == "alice@example.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"].datetime == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mx\.example\.test>", message["Message-ID"])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in message.get_payload()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not message.defects
    assert all(not part.defects for part in message.walk())


def test_message_ids_are_fresh():
    assert parse(build())["Message-ID"] != parse(build())["Message-ID"]


UTF8_RECIPIENT = FailedRecipient(
    recipient="jösé@exämple.test",
    action="failed",
    status="5.1.1",
    diagnostic="550 5.1.1 unknown user",
    remote_mta="192.0.2.25",
    last_attempt=NOW,
    will_retry_until=None,
)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"recipients": [FAILED, DELAYED]},
        {"original": b"Subject: caf\xe9\r\nX: 1\r\n\r\nbody\r\n"},
        {"recipients": [UTF8_RECIPIENT]},
        {"recipients": [UTF8_RECIPIENT], "smtputf8": True},
        {"original": b"Subject: caf\xc3\xa9\r\n\r\n", "smtputf8": True},
        {"original": b"Subject: LF only\nX: 1\n\nbody\n"},
    ],
    ids=["ascii", "mixed", "8bit", "utf8-rcpt", "smtputf8", "utf8-headers", "lf"],
)
def test_every_line_ends_in_crlf(overrides):
    """No bare LF and no bare CR anywhere in the report, whatever went in."""
    raw = build(**overrides)

    assert re.search(rb"(?<!\r)\n", raw) is None
    assert re.search(rb"\r(?!\n)", raw) is None
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_per_message_fields():
    per_message = status_blocks(build())[0]

    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["X-PowerMail-Queue-ID"] == "0123456789ABCDEFGH"
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL


def test_failed_recipient_fields():
    blocks = status_blocks(build())
    assert len(blocks) == 2
    fields = blocks[1]

    assert fields["Final-Recipient"] == "rfc822; bob@example.net"
    assert fields["Action"] == "failed"
    assert fields["Status"] == "5.1.1"
    assert fields["Remote-MTA"] == "dns; mx1.example.net"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert parsedate_to_datetime(fields["Last-Attempt-Date"]) == NOW
    assert "Will-Retry-Until" not in fields


def test_delayed_recipient_fields_and_subject():
    raw = build(recipients=[DELAYED])
    fields = status_blocks(raw)[1]

    assert parse(raw)["Subject"] == "Delayed Mail (still being retried)"
    assert fields["Action"] == "delayed"
    assert fields["Status"] == "4.4.1"
    assert fields["Diagnostic-Code"] == "smtp; 451 4.4.1 try again later"
    until = parsedate_to_datetime(fields["Will-Retry-Until"])
    assert until == NOW + timedelta(days=5)


def test_mixed_report_has_both_actions_in_order():
    raw = build(recipients=[DELAYED, FAILED])
    blocks = status_blocks(raw)

    assert [b["Action"] for b in blocks[1:]] == ["delayed", "failed"]
    subject = parse(raw)["Subject"]
    assert subject.startswith("Undelivered Mail Returned to Sender")
    assert "retried" in subject


def test_fields_left_out_when_unknown():
    bare = FailedRecipient("bob@example.net", "failed", "5.4.7")
    fields = status_blocks(build(recipients=[bare]))[1]

    assert set(fields.keys()) == {"Final-Recipient", "Action", "Status"}


def test_notification_explains_in_plain_words():
    """The person reads who failed, why, and the remote reply quoted."""
    raw = build(recipients=[FAILED, DELAYED])
    text = parse(raw).get_payload()[0].get_content()
    words = " ".join(text.split())

    assert "This is the mail system at mx.example.test." in words
    assert "could not be delivered to the recipients below" in words
    assert "has not yet been delivered to the recipients below" in words
    assert "<bob@example.net> Status 5.1.1: the mailbox does not exist." in words
    assert "mx1.example.net replied:\r\n      550 5.1.1 no such user\r\n" in text
    assert "<carol@example.org>" in words
    assert "keeps trying until Mon, 06 May 2024 10:00:00 +0000" in words
    assert "queue id 0123456789ABCDEFGH" in words
    assert all(len(line) <= 76 for line in text.splitlines())


def test_headers_part_is_the_original_header_section():
    raw = build()
    part = parse(raw).get_payload()[2]

    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_payload(decode=True) == ORIGINAL_HEADERS
    assert raw_bodies(raw)[2] == ORIGINAL_HEADERS
    assert b"The figures are attached" not in raw


def test_headers_part_of_a_message_without_body():
    raw = build(original=ORIGINAL_HEADERS)

    assert raw_bodies(raw)[2] == ORIGINAL_HEADERS


def test_lf_only_original_comes_back_with_crlf():
    raw = build(original=ORIGINAL.replace(b"\r\n", b"\n"))

    assert raw_bodies(raw)[2] == ORIGINAL_HEADERS


def test_8bit_headers_without_smtputf8_are_quoted_printable():
    """The report stays 7-bit, and decoding gives back the exact octets."""
    headers = b"Subject: caf\xe9 cr\xc3\xa8me \r\nFrom: a@example.test\r\n"
    raw = build(original=headers + b"\r\nbody\r\n")
    part = parse(raw).get_payload()[2]

    assert raw.isascii()
    assert part.get_content_type() == "text/rfc822-headers"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == headers


def test_smtputf8_report_uses_the_global_types():
    headers = b"Subject: caf\xc3\xa9\r\nTo: j\xc3\xb6s\xc3\xa9@ex\xc3\xa4mple.test\r\n"
    raw = build(
        recipients=[UTF8_RECIPIENT, DELAYED],
        original=headers + b"\r\nbody\r\n",
        smtputf8=True,
    )
    message = parse(raw)

    assert message.get_param("report-type") == "global-delivery-status"
    assert [part.get_content_type() for part in message.get_payload()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert raw_bodies(raw)[2] == headers
    blocks = raw_status_blocks(raw)
    assert blocks[0]["Reporting-MTA"] == "dns; mx.example.test"
    assert blocks[1]["Final-Recipient"] == "utf-8; jösé@exämple.test"
    assert blocks[1]["Remote-MTA"] == "dns; [192.0.2.25]"
    assert blocks[2]["Final-Recipient"] == "rfc822; carol@example.org"
    assert blocks[2]["Will-Retry-Until"]
    assert "<jösé@exämple.test>" in message.get_payload()[0].get_content()


def test_utf8_recipient_without_smtputf8_is_spelled_in_ascii():
    """RFC 6533 utf-8-addr-xtext: \\x{HEX} for non-ASCII, and for + and =."""
    rcpt = FailedRecipient(
        "jösé+tag@exämple.test", "failed", "5.1.1", None, None, None, None
    )
    raw = build(recipients=[rcpt])
    fields = status_blocks(raw)[1]

    assert raw.isascii()
    assert parse(raw).get_param("report-type") == "delivery-status"
    assert fields["Final-Recipient"] == (
        "utf-8; j\\x{F6}s\\x{E9}\\x{2B}tag@ex\\x{E4}mple.test"
    )


def test_non_ascii_diagnostic_is_kept_in_a_global_report_only():
    rcpt = FailedRecipient(
        "bob@example.net", "failed", "5.7.1", "550 5.7.1 refusé", None, None, None
    )

    plain = status_blocks(build(recipients=[rcpt]))[1]
    assert plain["Diagnostic-Code"] == "smtp; 550 5.7.1 refus\\x{E9}"
    utf8 = raw_status_blocks(build(recipients=[rcpt], smtputf8=True))[1]
    assert utf8["Diagnostic-Code"] == "smtp; 550 5.7.1 refusé"


def test_multiline_reply_becomes_one_field_line():
    rcpt = FailedRecipient(
        "bob@example.net",
        "failed",
        "5.7.1",
        "550-5.7.1 policy\r\n550 5.7.1 see https://example.net/why",
        "mx1.example.net",
        None,
        None,
    )
    fields = status_blocks(build(recipients=[rcpt]))[1]

    assert fields["Diagnostic-Code"] == (
        "smtp; 550-5.7.1 policy 550 5.7.1 see https://example.net/why"
    )


def test_reply_that_looks_encoded_stays_as_it_came():
    rcpt = FailedRecipient(
        "bob@example.net", "failed", "5.1.1", "550 =?utf-8?q?x?=", None, None, None
    )
    raw = build(recipients=[rcpt])

    assert b"Diagnostic-Code: smtp; 550 =?utf-8?q?x?=\r\n" in raw


def test_long_address_is_not_folded_or_encoded():
    long_domain = ".".join(["sub" + "d" * 55] * 3) + ".example"
    rcpt = FailedRecipient(f"srs0=ab=xy={'x' * 40}@{long_domain}", "failed", "5.1.1")
    raw = build(recipients=[rcpt])

    assert f"Final-Recipient: rfc822; {rcpt.recipient}\r\n".encode() in raw


def test_non_smtp_diagnostic_gets_its_own_type():
    rcpt = FailedRecipient(
        "bob@example.net", "delayed", "4.4.1", diagnostic="connection refused"
    )
    fields = status_blocks(build(recipients=[rcpt]))[1]

    assert fields["Diagnostic-Code"] == "X-PowerMail; connection refused"


def test_ipv6_remote_mta_is_an_address_literal():
    rcpt = FailedRecipient(
        "bob@example.net", "failed", "5.1.1", None, "2001:db8::25", None, None
    )
    fields = status_blocks(build(recipients=[rcpt]))[1]

    assert fields["Remote-MTA"] == "dns; [IPv6:2001:db8::25]"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"sender": ""}, "null sender"),
        ({"recipients": []}, "at least one recipient"),
        (
            {"recipients": [FailedRecipient("b@x.test", "relayed", "2.0.0")]},
            "action",
        ),
        ({"recipients": [FailedRecipient("b@x.test", "failed", "550")]}, "status"),
    ],
)
def test_refuses_what_cannot_be_reported(overrides, reason):
    with pytest.raises(ValueError, match=reason):
        build(**overrides)
