"""Lines over 998 octets: the parts holding them are re-encoded, nothing else."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from powermail.queue.reencode import fit_for_transport

TRACE = b"Received: from a ([192.0.2.1])\r\n\tby mx.test (PowerMail) with ESMTP id X; Thu, 3 Dec 2026 10:00:00 +0000\r\n"


def longest(data: bytes) -> int:
    return max(map(len, data.split(b"\r\n")))


def test_message_without_long_lines_is_untouched():
    raw = TRACE + b"Subject: short\r\n\r\nhello\r\n"
    assert fit_for_transport(raw) is raw


def test_long_text_part_is_base64_and_says_the_same():
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "a@b.test"
    msg["Subject"] = "long"
    msg.set_content("start\n" + "é" * 3000 + "\nend\n", cte="8bit")
    msg.add_attachment(
        b"%PDF-1.4 tiny", maintype="application", subtype="pdf", filename="x.pdf"
    )
    raw = TRACE + msg.as_bytes()
    assert longest(raw) > 998
    fitted = fit_for_transport(raw)
    assert longest(fitted) <= 998
    assert fitted.startswith(TRACE + b"From: a@b.test\r\nSubject: long\r\n")
    assert b"\n" not in fitted.replace(b"\r\n", b"")
    before = email.message_from_bytes(raw, policy=email.policy.default)
    after = email.message_from_bytes(fitted, policy=email.policy.default)
    pairs = zip(before.walk(), after.walk(), strict=True)
    for old, new in pairs:
        if not old.is_multipart():
            if old.get_content_maintype() == "text":
                # Line ends aside (base64 text carries CRLF), the same text.
                assert old.get_content().replace(
                    "\r\n", "\n"
                ) == new.get_content().replace("\r\n", "\n")
            else:
                assert old.get_content() == new.get_content()
            assert old.get_content_type() == new.get_content_type()
    text = next(p for p in after.walk() if p.get_content_type() == "text/plain")
    assert text["Content-Transfer-Encoding"] == "base64"
    pdf = next(p for p in after.walk() if p.get_content_type() == "application/pdf")
    assert pdf.get_content() == b"%PDF-1.4 tiny"


def test_plain_message_gets_a_mime_version():
    raw = b"Subject: x\r\n\r\n" + b"y" * 1500 + b"\r\n"
    fitted = fit_for_transport(raw)
    parsed = email.message_from_bytes(fitted, policy=email.policy.default)
    assert parsed["MIME-Version"] == "1.0"
    assert parsed.get_content() == "y" * 1500 + "\r\n"
    assert longest(fitted) <= 998
