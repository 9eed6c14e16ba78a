"""PowerMail's IMAP server against Dovecot on the same large Maildir.

Run by hand, never by the test suite::

    .venv/bin/python bench/imap.py [--messages 10000] [--rounds 3] [--seed 1]
        [--keep]

A Maildir of N realistic messages (plain text, multipart/alternative, some
with attachments; 2-50 KiB; encoded-word subjects; CRLF line ends) is built
from a seeded random generator, written straight into ``cur/`` under
Dovecot-style names.  Two copies of it are served, one by PowerMail
(``twistd -n powermail``) and one by a private Dovecot (``tests/dovecot.py``),
both on loopback with a plaintext LOGIN.

Each server first opens its copy once (the cold SELECT, without any
uidlist or index, and a FETCH 1:* (FLAGS)); the timed rounds then open it
again, each round in a new session: SELECT, FETCH of all headers, FETCH of
every whole message, UID SEARCH SUBJECT, SEARCH UNSEEN, SEARCH BODY.  The
median of each is printed with the PowerMail/Dovecot ratio.  Every answer
is checked against the generated messages and against the other server.

Last, PowerMail's RSS is read in fresh processes with a 1,000-message and
with the N-message mailbox selected.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import imaplib
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

from _common import (
    HOST,
    REPO_ROOT,
    Server,
    free_port,
    log_problems,
    log_tail,
    powermail_argv,
    start_server,
    which_powermail,
)

# tests/dovecot.py starts the private Dovecot; the checkout's powermail
# package hashes the password for PowerMail's configuration.
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]

from dovecot import DOVECOT, DovecotProcess, dovecot_available, start_dovecot  # noqa: E402

from powermail.passwords import hash_password  # noqa: E402

DOMAIN = "example.test"
USER = f"alice@{DOMAIN}"
SMALL_USER = f"bob@{DOMAIN}"
PASSWORD = "bench-password"
# The word in about 1 % of the subjects, and the one in about 1 % of the
# bodies; neither occurs anywhere else in the generated mail.
SUBJECT_WORD = "kestrel"
BODY_WORD = "quetzal"
SAMPLE_SIZE = 50
# The mailbox RSS is compared against, and the most it may add.
SMALL_MAILBOX = 1000
RSS_BUDGET = 30 * 1024 * 1024
KiB = 1024
MiB = 1024 * 1024

OPERATIONS = (
    ("select", "SELECT INBOX"),
    ("headers", "FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER])"),
    ("bodies", "FETCH 1:* (BODY.PEEK[])"),
    ("subject", f'UID SEARCH SUBJECT "{SUBJECT_WORD}"'),
    ("unseen", "SEARCH UNSEEN"),
    ("body", f'SEARCH BODY "{BODY_WORD}"'),
)


# -- the mailbox ------------------------------------------------------------------

_WORDS = """
the of and to in is for that on with as by this be are from at or have an
was we will not can all your it more our which has new one about their
been also if would were other its time only but these some may two any
there when what so up out them most than into first could over such like
use make made well back after work should through year years before much
where just those both each many then under know because very here while
last team week meeting report project plan budget review customer order
invoice payment delivery schedule update release version server network
account office travel contract draft proposal figures quarter results
numbers support ticket issue change request approval deadline agenda
minutes notes summary feedback design product launch market sales price
offer discount shipping tracking package warehouse stock supplier partner
training session workshop conference slides document attached please
thanks regards hello dear sorry confirm available tomorrow monday tuesday
wednesday thursday friday morning afternoon evening call phone email list
""".split()
_ACCENTED = (
    "café Grüße Zürich façade résumé smörgåsbord über déjà crème jalapeño "
    "São Málaga Ærøskøbing naïve Øresund Kraków Łódź Brașov Besançon Göteborg"
).split()
_TOPICS = (
    "quarterly figures",
    "team meeting on Thursday",
    "budget review",
    "customer feedback",
    "release planning",
    "server maintenance window",
    "travel arrangements",
    "contract renewal",
    "invoice for the last order",
    "shipping confirmation",
    "product launch checklist",
    "minutes of the board meeting",
    "support ticket escalation",
    "holiday schedule",
    "new office layout",
    "training session slides",
    "partner workshop agenda",
    "price list for next year",
    "warehouse stock levels",
    "weekly status report",
    "draft proposal",
    "conference registration",
    "password policy change",
    "network upgrade",
    "sales numbers by region",
)
_ACCENTED_TOPICS = (
    "Grüße aus Zürich",
    "Réunion de l'équipe à Besançon",
    "Смета на квартал",
    "Ærøskøbing: møde på fredag",
    "Café am Montag?",
    "Przegląd budżetu w Łodzi",
    "São Paulo: relatório semanal",
    "Fika på Göteborgskontoret",
    "会議の議事録",
    "Crème brûlée für alle",
)
_FIRST = (
    "Anna Ben Carla David Emma Felix Grace Hugo Ines Jonas Karin Lukas Maria "
    "Nora Oscar Paula Quentin Rosa Simon Tara Ugo Vera Walter Xenia Yusuf Zoe"
).split()
_LAST = (
    "Smith Miller Garcia Weber Rossi Dubois Novak Larsen Jensen Kowalski "
    "Silva Tanaka Berg Moreau Fischer Costa Horvat Lindqvist Murphy Keller"
).split()
_ACCENTED_NAMES = (
    "José Müller",
    "Zoë Łukasiewicz",
    "François Lefèvre",
    "Søren Ødegård",
    "Małgorzata Wójcik",
    "Jürgen Straß",
    "田中 太郎",
    "Ângela Conceição",
)
_DOMAINS = (
    "acme.example",
    "globex.example",
    "initech.example",
    "umbrella.example",
    "example.org",
    "example.net",
    "mail.example.com",
    "partners.example",
)
_LISTS = (
    ("Team Updates", "updates.lists.example.org"),
    ("Acme News", "news.acme.example"),
    ("Ops Announce", "ops-announce.example.net"),
)
_MAILERS = (
    "Microsoft Outlook 16.0",
    "Mozilla Thunderbird 115.6.0",
    "Apple Mail (2.3774.300.61.1.2)",
    "Roundcube Webmail/1.6.5",
    None,
    None,
)
_ZONES = (0, 1, 2, -5, -8, 9, 5.5, -3)
# 2023-01-01 00:00 UTC: the first message arrives about then.
_EPOCH = 1672531200


def _wrap(words: list[str], width: int = 72) -> str:
    """The words as lines of at most ``width`` characters."""
    lines: list[str] = []
    line = ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return "\n".join(lines)


def _sentence(rng: random.Random, vocabulary: Sequence[str]) -> list[str]:
    words = [rng.choice(vocabulary) for _ in range(rng.randint(6, 18))]
    words[0] = words[0].capitalize()
    words[-1] += rng.choice(".....?!")
    return words


def _paragraph_pool(rng: random.Random, count: int, *, accented: bool) -> list[str]:
    """Wrapped paragraphs that messages are built from."""
    pool = []
    for _ in range(count):
        words: list[str] = []
        for _ in range(rng.randint(2, 6)):
            words += _sentence(rng, _WORDS)
        if accented:
            for _ in range(rng.randint(1, 4)):
                words[rng.randrange(len(words))] = rng.choice(_ACCENTED)
        pool.append(_wrap(words))
    return pool


def _q_char(octet: int) -> str:
    """One octet in RFC 2047's Q encoding (as in a phrase: few characters bare)."""
    char = chr(octet)
    if char == " ":
        return "_"
    if char.isascii() and (char.isalnum() or char in "!*+-/"):
        return char
    return f"={octet:02X}"


def _encoded_words(text: str, charset: str, kind: str) -> str:
    """``text`` as RFC 2047 encoded words of at most 75 characters, folded.

    Words are cut between characters, never inside one.
    """

    def encode(chunk: str) -> str:
        raw = chunk.encode(charset)
        if kind == "B":
            payload = base64.b64encode(raw).decode()
        else:
            payload = "".join(_q_char(b) for b in raw)
        return f"=?{charset.upper()}?{kind}?{payload}?="

    words = []
    chunk = ""
    for char in text:
        if chunk and len(encode(chunk + char)) > 75:
            words.append(encode(chunk))
            chunk = ""
        chunk += char
    words.append(encode(chunk))
    return "\n ".join(words)


def _header_text(rng: random.Random, text: str, *, latin: bool = True) -> str:
    """A header value: as it is when ASCII, else as encoded words.

    Some values that ISO-8859-1 can hold are encoded in it, unless ``latin``
    is false: the Dovecot of tests/dovecot.py runs chrooted into the Maildir,
    where iconv finds no gconv modules, so it decodes UTF-8 encoded words only
    and a search would not find the word in the others.
    """
    if text.isascii():
        return text
    try:
        text.encode("iso-8859-1")
    except UnicodeEncodeError:
        latin = False
    choice = rng.random()
    if latin and choice < 0.3:
        return _encoded_words(text, "iso-8859-1", "Q")
    if choice < 0.65:
        return _encoded_words(text, "utf-8", "B")
    return _encoded_words(text, "utf-8", "Q")


def _qp(text: str) -> str:
    return binascii.b2a_qp(text.encode("utf-8")).decode("ascii")


def _b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii").rstrip("\n")


def _size_between(rng: random.Random, median: float, sigma: float, low: int, high: int):
    return int(min(max(rng.lognormvariate(math.log(median), sigma), low), high))


@dataclass
class GeneratedMessage:
    """What the generator knows about one message, to check the answers."""

    name: str
    size: int
    digest: bytes
    header_digest: bytes
    flags: frozenset[str]
    kind: str
    subject_word: bool
    encoded_subject: bool
    body_word: bool


@dataclass
class Mailbox:
    """The generated Maildir: its folder and every message, in UID order."""

    path: Path
    messages: list[GeneratedMessage]
    seconds: float

    @property
    def total_size(self) -> int:
        return sum(m.size for m in self.messages)

    # What each search must find.  UIDs and message numbers are the same
    # here: UID n is the n-th message generated, and nothing is expunged.

    def expected_subject_uids(self) -> list[int]:
        return [i for i, m in enumerate(self.messages, 1) if m.subject_word]

    def expected_body_numbers(self) -> list[int]:
        return [i for i, m in enumerate(self.messages, 1) if m.body_word]

    def expected_unseen(self) -> list[int]:
        return [i for i, m in enumerate(self.messages, 1) if "\\Seen" not in m.flags]

    def describe(self) -> str:
        """A few lines on the mailbox's sizes, kinds and search words."""
        sizes = sorted(m.size for m in self.messages)
        kinds = {k: 0 for k in ("text/plain", "alternative", "mixed")}
        for m in self.messages:
            kinds[m.kind] += 1
        subject = self.expected_subject_uids()
        encoded = sum(1 for m in self.messages if m.encoded_subject)
        encoded_word = sum(
            1 for m in self.messages if m.subject_word and m.encoded_subject
        )
        return (
            f"{len(sizes)} messages, {self.total_size / MiB:.1f} MiB, sizes "
            f"min {sizes[0] / KiB:.1f} / median {statistics.median(sizes) / KiB:.1f}"
            f" / mean {statistics.mean(sizes) / KiB:.1f} / max {sizes[-1] / KiB:.1f}"
            f" KiB\n  {kinds['text/plain']} text/plain, {kinds['alternative']} "
            f"multipart/alternative, {kinds['mixed']} multipart/mixed with "
            f"attachments; {encoded} encoded-word subjects; "
            f"{len(self.expected_unseen())} unseen\n"
            f'  "{SUBJECT_WORD}" in {len(subject)} subjects ({encoded_word} of them '
            f'encoded words), "{BODY_WORD}" in {len(self.expected_body_numbers())} '
            f"bodies"
        )


class _Generator:
    """Realistic, deterministic mail for one mailbox."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.plain_pool = _paragraph_pool(rng, 600, accented=False)
        self.accented_pool = _paragraph_pool(rng, 300, accented=True)
        self.senders = []
        for _ in range(300):
            if rng.random() < 0.1:
                name = rng.choice(_ACCENTED_NAMES)
                local = f"user{rng.randrange(1000)}"
            else:
                first, last = rng.choice(_FIRST), rng.choice(_LAST)
                name = f"{first} {last}"
                local = rng.choice((f"{first}.{last}", f"{first[0]}{last}", first))
            self.senders.append((name, f"{local.lower()}@{rng.choice(_DOMAINS)}"))

    def text(self, chars: int, *, accented: bool) -> str:
        """Paragraphs adding up to about ``chars`` characters."""
        rng = self.rng
        pool = self.accented_pool if accented else self.plain_pool
        parts = [rng.choice(("Hello,", "Hi all,", "Dear Alice,", "Good morning,"))]
        size = len(parts[0])
        while size < chars:
            paragraph = rng.choice(pool)
            parts.append(paragraph)
            size += len(paragraph) + 2
        parts.append(rng.choice(("Best regards", "Thanks", "Cheers", "Kind regards")))
        return "\n\n".join(parts) + "\n"

    def with_word(self, text: str, word: str) -> str:
        """``text`` with one of its words (past the greeting) replaced by ``word``."""
        rng = self.rng
        lines = text.split("\n")
        candidates = [i for i, line in enumerate(lines) if i > 1 and " " in line]
        index = rng.choice(candidates)
        words = lines[index].split(" ")
        words[rng.randrange(len(words))] = word
        lines[index] = " ".join(words)
        return "\n".join(lines)

    def headers(self, index: int, received: int) -> tuple[list[str], dict]:
        """The top header fields (without the MIME ones) and facts about them."""
        rng = self.rng
        name, address = rng.choice(self.senders)
        listed = rng.random() < 0.15
        if listed:
            list_name, list_id = rng.choice(_LISTS)
            name, address = list_name, f"noreply@{list_id.split('.', 1)[1]}"
        domain = address.split("@", 1)[1]

        subject_word = rng.random() < 0.01
        encoded = rng.random() < (0.3 if subject_word else 0.12)
        topic = rng.choice(_ACCENTED_TOPICS if encoded else _TOPICS)
        if subject_word:
            topic = rng.choice(
                (
                    f"Kestrel {topic}",
                    f"{topic} (kestrel)",
                    f"kestrel migration: {topic}",
                    f"{topic} for the Kestrel team",
                )
            )
        reply = rng.random() < 0.25
        prefix = "Re: " if reply else ("Fwd: " if rng.random() < 0.05 else "")
        if listed:
            prefix = f"[{list_name}] " + prefix
        subject = _header_text(rng, prefix + topic, latin=not subject_word)

        zone = timezone(timedelta(hours=rng.choice(_ZONES)))
        sent = datetime.fromtimestamp(received - rng.randint(2, 900), zone)
        arrived = format_datetime(datetime.fromtimestamp(received, UTC))
        fields = [f"Return-Path: <{address}>", f"Delivered-To: {USER}"]
        fields.append(
            f"Received: from mx.{domain} (mx.{domain} [192.0.2.{rng.randint(1, 254)}])"
            f"\n\tby mx.{DOMAIN} (PowerMail) with ESMTPS id "
            f"{rng.getrandbits(48):012X}\n\tfor <{USER}>; {arrived}"
        )
        for hop in range(rng.randint(0, 2)):
            fields.append(
                f"Received: from relay{hop}.{domain} ([10.{hop}.{rng.randint(0, 255)}."
                f"{rng.randint(1, 254)}])\n\tby mx.{domain} with ESMTP id "
                f"{rng.getrandbits(40):010x}; {format_datetime(sent)}"
            )
        if rng.random() < 0.5:
            signature = _b64(rng.randbytes(256)).replace("\n", "")
            folded = "\n\t ".join(
                signature[i : i + 70] for i in range(0, len(signature), 70)
            )
            fields.append(
                f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain};"
                f"\n\ts=mail2023; t={received}; h=from:to:subject:date:message-id;"
                f"\n\tbh={_b64(rng.randbytes(32))};\n\tb={folded}"
            )
        fields.append(f"From: {_header_text(rng, name)} <{address}>")
        fields.append(f"To: Alice Example <{USER}>")
        if rng.random() < 0.2:
            others = rng.sample(self.senders, rng.randint(1, 3))
            fields.append(
                "Cc: " + ",\n ".join(f"{_header_text(rng, n)} <{a}>" for n, a in others)
            )
        fields.append(f"Subject: {subject}")
        fields.append(f"Date: {format_datetime(sent)}")
        fields.append(
            f"Message-ID: <{received:x}.{index}.{rng.getrandbits(40):010x}@{domain}>"
        )
        if reply:
            parent = f"<{rng.getrandbits(64):016x}@{DOMAIN}>"
            fields += [f"In-Reply-To: {parent}", f"References: {parent}"]
        if listed:
            fields += [
                f"List-Id: {list_name} <{list_id}>",
                f"List-Unsubscribe: <mailto:unsubscribe@{list_id}>",
                "Precedence: bulk",
            ]
        mailer = rng.choice(_MAILERS)
        if mailer:
            fields.append(f"X-Mailer: {mailer}")
        fields.append("MIME-Version: 1.0")
        facts = {"subject_word": subject_word, "encoded_subject": encoded}
        return fields, facts

    def text_part(self, text: str, *, html: bool = False) -> tuple[list[str], str]:
        """MIME fields and encoded body of one text part."""
        rng = self.rng
        if html:
            paragraphs = "\n".join(
                f"<p>{p.replace(chr(10), ' ')}</p>" for p in text.split("\n\n")
            )
            body = (
                '<html><head><meta charset="utf-8"></head>\n<body>'
                '<div style="font-family: Arial, sans-serif; font-size: 11pt">\n'
                f"{paragraphs}\n</div></body></html>\n"
            )
            return [
                'Content-Type: text/html; charset="utf-8"',
                "Content-Transfer-Encoding: quoted-printable",
            ], _qp(body)
        if text.isascii() and rng.random() < 0.7:
            return [
                "Content-Type: text/plain; charset=us-ascii; format=flowed",
                "Content-Transfer-Encoding: 7bit",
            ], text
        choice = rng.random()
        if choice < 0.6:
            return [
                'Content-Type: text/plain; charset="utf-8"',
                "Content-Transfer-Encoding: quoted-printable",
            ], _qp(text)
        if choice < 0.8:
            return [
                "Content-Type: text/plain; charset=UTF-8",
                "Content-Transfer-Encoding: 8bit",
            ], text
        return [
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: base64",
        ], _b64(text.encode("utf-8"))

    def attachment(self, raw_size: int) -> tuple[list[str], str]:
        """MIME fields and base64 body of one attachment."""
        rng = self.rng
        kind = rng.random()
        number = rng.randrange(10000)
        if kind < 0.45:
            data = b"%PDF-1.7\n" + rng.randbytes(raw_size)
            ctype, name = "application/pdf", f"invoice-{number:04d}.pdf"
        elif kind < 0.75:
            data = b"\x89PNG\r\n\x1a\n" + rng.randbytes(raw_size)
            ctype, name = "image/png", f"photo_{number}.png"
        elif kind < 0.9:
            rows = ["date,amount,description"]
            while sum(len(r) + 2 for r in rows) < raw_size:
                rows.append(
                    f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},"
                    f"{rng.randint(1, 99999) / 100:.2f},{rng.choice(_WORDS)}"
                )
            data = ("\r\n".join(rows) + "\r\n").encode()
            ctype, name = "text/csv", f"report-{number}.csv"
        else:
            data = rng.randbytes(raw_size)
            ctype, name = "application/octet-stream", f"résumé-{number}.bin"
        if name.isascii():
            disposition = f'filename="{name}"'
            ctype_name = f'name="{name}"'
        else:
            # RFC 2231 in the disposition, RFC 2047 in the type, as clients do.
            quoted = "".join(
                chr(b) if chr(b).isalnum() or chr(b) in "-._" else f"%{b:02X}"
                for b in name.encode("utf-8")
            )
            disposition = f"filename*=UTF-8''{quoted}"
            ctype_name = f'name="{_encoded_words(name, "utf-8", "B")}"'
        return [
            f"Content-Type: {ctype}; {ctype_name}",
            "Content-Transfer-Encoding: base64",
            f"Content-Disposition: attachment; {disposition}",
        ], _b64(data)

    def message(self, index: int, received: int) -> tuple[bytes, dict]:
        """One message of 2 to 50 KiB with CRLF line ends, and facts about it."""
        rng = self.rng
        fields, facts = self.headers(index, received)
        choice = rng.random()
        if choice < 0.5:
            kind = "text/plain"
            total = _size_between(rng, 4700, 0.55, 2 * KiB, 50 * KiB)
        elif choice < 0.82:
            kind = "alternative"
            total = _size_between(rng, 4700, 0.55, 2 * KiB, 50 * KiB)
        else:
            kind = "mixed"
            total = _size_between(rng, 11000, 0.6, 4 * KiB, 48 * KiB)
        accented = rng.random() < 0.35
        facts["body_word"] = rng.random() < 0.01
        facts["kind"] = kind

        # The sizes of the parts are estimates; a message that comes out too
        # small or too large is made again, aiming nearer the middle.
        for _ in range(10):
            top_fields, body = self.body(
                index, kind, total, fields, accented=accented, word=facts["body_word"]
            )
            text = "\n".join(fields + top_fields) + "\n\n" + body
            data = text.replace("\n", "\r\n").encode("utf-8")
            if 2 * KiB <= len(data) <= 50 * KiB:
                break
            aim = 2.2 * KiB if len(data) < 2 * KiB else 48 * KiB
            total = int(total * aim / len(data))
        return data, facts

    def body(
        self,
        index: int,
        kind: str,
        total: int,
        fields: list[str],
        *,
        accented: bool,
        word: bool,
    ) -> tuple[list[str], str]:
        """The top MIME fields and the body of a message of about ``total`` octets."""
        rng = self.rng
        header_size = sum(len(f) + 2 for f in fields)
        if kind == "text/plain":
            text_size = total - header_size - 120
        elif kind == "alternative":
            text_size = (total - header_size - 500) / 2.7
        else:
            text_size = min(_size_between(rng, 1800, 0.5, 400, 8000), total / 3)
        text = self.text(max(int(text_size), 300), accented=accented)
        if word:
            text = self.with_word(text, BODY_WORD)

        def multipart(subtype: str, parts: list[tuple[list[str], str]]):
            mark = f"=_{rng.getrandbits(64):016x}.{index}"
            body = "This is a multi-part message in MIME format.\n"
            for part_fields, part_body in parts:
                body += f"\n--{mark}\n" + "\n".join(part_fields) + "\n\n" + part_body
            body += f"\n--{mark}--\n"
            return [f'Content-Type: multipart/{subtype};\n\tboundary="{mark}"'], body

        if kind == "text/plain":
            return self.text_part(text)
        inner = multipart(
            "alternative", [self.text_part(text), self.text_part(text, html=True)]
        )
        if kind == "alternative":
            return inner
        budget = total - header_size - len(inner[1]) - 600
        count = 1 if budget < 8000 or rng.random() < 0.7 else 2
        raw = max(int(budget * 0.72 / count), 512)
        parts = [inner] + [self.attachment(raw) for _ in range(count)]
        return multipart("mixed", parts)


def build_mailbox(path: Path, count: int, seed: int) -> Mailbox:
    """Write ``count`` messages into ``path/cur`` under Dovecot-style names.

    Each file is named ``<time>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<size>:2,``
    with its flag letters, and gets its arrival time as mtime.  The arrival
    times only grow, so both servers give the UIDs in the generated order.
    """
    began = time.monotonic()
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    generator = _Generator(seed)
    rng = generator.rng
    received = _EPOCH
    pid = rng.randint(1000, 60000)
    messages = []
    for index in range(count):
        received += rng.randint(60, 2400)
        if rng.random() < 0.05:
            pid = rng.randint(1000, 60000)
        data, facts = generator.message(index, received)
        roll = rng.random()
        if roll < 0.72:
            letters = "S"
        elif roll < 0.77:
            letters = "RS"
        elif roll < 0.79:
            letters = "FS"
        elif roll < 0.8:
            letters = "F"
        else:
            letters = ""
        size = len(data)
        name = (
            f"{received}.M{rng.randrange(1000000)}P{pid}Q{index + 1}.mail.{DOMAIN}"
            f",S={size},W={size}:2,{letters}"
        )
        file_path = path / "cur" / name
        file_path.write_bytes(data)
        os.utime(file_path, (received, received))
        flags = {"S": "\\Seen", "R": "\\Answered", "F": "\\Flagged"}
        messages.append(
            GeneratedMessage(
                name=name,
                size=size,
                digest=_digest(data),
                header_digest=_digest(data[: data.index(b"\r\n\r\n") + 4]),
                flags=frozenset(flags[letter] for letter in letters),
                kind=facts["kind"],
                subject_word=facts["subject_word"],
                encoded_subject=facts["encoded_subject"],
                body_word=facts["body_word"],
            )
        )
    return Mailbox(path, messages, time.monotonic() - began)


def copy_mailbox(source: Mailbox, target: Path, count: int | None = None) -> None:
    """A fresh copy of the first ``count`` messages (all by default), mtimes kept."""
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for message in source.messages[:count]:
        shutil.copy2(source.path / "cur" / message.name, target / "cur" / message.name)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


# -- the servers ------------------------------------------------------------------


@dataclass
class ImapServer:
    """A server under test as the client sees it: a port and its CPU clock."""

    name: str
    port: int
    cpu_seconds: Callable[[], float]


def write_config(folder: Path, password_hash: str) -> tuple[Path, int]:
    """A PowerMail configuration with alice and bob on free ports; the IMAP port."""
    mx, imap = free_port(), free_port()
    imaps = free_port(mx, imap)
    path = folder / "powermail.toml"
    path.write_text(
        f"""\
# Written by bench/imap.py for one benchmark run.

[server]
hostname = "mx.{DOMAIN}"
data_dir = "data"

[tls]
certificate = ""
private_key = ""

[mx]
listen = ["{HOST}:{mx}"]

[imap]
listen = ["{HOST}:{imap}"]
tls_listen = ["{HOST}:{imaps}"]

[domains."{DOMAIN}"]

[mailboxes."{USER}"]
password = "{password_hash}"

[mailboxes."{SMALL_USER}"]
password = "{password_hash}"

[aliases]
"postmaster@{DOMAIN}" = ["{USER}"]
"abuse@{DOMAIN}" = ["{USER}"]
""",
        encoding="utf-8",
    )
    return path, imap


def powermail_maildir(folder: Path, user: str) -> Path:
    """Where PowerMail keeps ``user``'s Maildir under the data folder."""
    local, domain = user.split("@")
    return folder / "data" / "mail" / domain / local / "Maildir"


def start_powermail(folder: Path, config: Path, port: int, name: str) -> Server:
    """Start ``twistd -n powermail`` and wait for its IMAP greeting."""
    server = start_server(name, powermail_argv(config), port=port, folder=folder)
    deadline = time.monotonic() + 30
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {server.process.returncode}:\n"
                f"{log_tail(server.log_path)}"
            )
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                if sock.recv(512).startswith(b"* OK"):
                    sock.sendall(b"a LOGOUT\r\n")
                    while sock.recv(512):
                        pass
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} does not answer on IMAP port {port}")
        time.sleep(0.1)


def session_cpu_seconds(session: int) -> float:
    """User plus system CPU of every living process of a session (Dovecot's)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[3]) == session:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def dovecot_problems(dovecot: DovecotProcess) -> list[str]:
    """The warnings and errors of Dovecot's log (not the SIGTERM at the end)."""
    return [
        line
        for line in dovecot.log().splitlines()
        if re.search(r": (Warning|Error|Fatal|Panic):", line)
        and "Killed with signal 15" not in line
    ]


# -- the client -------------------------------------------------------------------


class CheckError(Exception):
    """An answer that differs from the generated mail or from the other server."""


def connect(server: ImapServer, user: str = USER) -> imaplib.IMAP4:
    """A new session, logged in with plaintext LOGIN."""
    client = imaplib.IMAP4(HOST, server.port, timeout=600)
    _ok(client.login(user, PASSWORD))
    return client


def _ok(result: tuple[str, list]) -> list:
    typ, data = result
    if typ != "OK":
        raise CheckError(f"{typ} {data!r}")
    return data


_UID = re.compile(rb"\bUID (\d+)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


@dataclass(frozen=True)
class Fetched:
    """One FETCH response: its number, the data items and the literal."""

    seq: int
    uid: int | None
    flags: frozenset[str] | None
    size: int | None
    literal: bytes | None


def parse_fetch(data: list) -> list[Fetched]:
    """imaplib's FETCH data: ``(prefix, literal)`` then the trailer, or a line."""
    out = []
    items = iter(data)
    for item in items:
        literal = None
        if isinstance(item, tuple):
            meta, literal = item[0], item[1]
            meta = re.sub(rb"\{\d+\}$", b"", meta) + next(items, b"")
        else:
            meta = item
        seq = int(meta.split(b" ", 1)[0])
        uid = _UID.search(meta)
        flags = _FLAGS.search(meta)
        size = _SIZE.search(meta)
        out.append(
            Fetched(
                seq,
                int(uid.group(1)) if uid else None,
                frozenset(flags.group(1).decode().split()) - {"\\Recent"}
                if flags
                else None,
                int(size.group(1)) if size else None,
                literal,
            )
        )
    return out


def _numbers(data: list) -> list[int]:
    return [int(n) for line in data if line for n in line.split()]


# One function per timed operation, the same for both servers.


def op_select(client: imaplib.IMAP4) -> int:
    """SELECT INBOX; the number of messages."""
    return int(_ok(client.select("INBOX"))[0])


def op_fetch_flags(client: imaplib.IMAP4) -> int:
    """FETCH 1:* (FLAGS), the warm-up; the number of answers."""
    return len(parse_fetch(_ok(client.fetch("1:*", "(FLAGS)"))))


def op_headers(client: imaplib.IMAP4) -> list[Fetched]:
    """Every message's UID, flags, size and whole header."""
    return parse_fetch(
        _ok(client.fetch("1:*", "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER])"))
    )


def op_bodies(client: imaplib.IMAP4) -> list[Fetched]:
    """Every message, every octet of it."""
    return parse_fetch(_ok(client.fetch("1:*", "(BODY.PEEK[])")))


def op_subject(client: imaplib.IMAP4) -> list[int]:
    """The UIDs whose Subject holds SUBJECT_WORD."""
    return _numbers(_ok(client.uid("SEARCH", "SUBJECT", f'"{SUBJECT_WORD}"')))


def op_unseen(client: imaplib.IMAP4) -> list[int]:
    """The numbers of the messages without \\Seen."""
    return _numbers(_ok(client.search(None, "UNSEEN")))


def op_body(client: imaplib.IMAP4) -> list[int]:
    """The numbers of the messages whose body holds BODY_WORD."""
    return _numbers(_ok(client.search(None, "BODY", f'"{BODY_WORD}"')))


_CLIENT_OPS = {
    "select": op_select,
    "headers": op_headers,
    "bodies": op_bodies,
    "subject": op_subject,
    "unseen": op_unseen,
    "body": op_body,
}


@dataclass
class Timing:
    """One operation once: wall clock, server CPU and client CPU seconds."""

    seconds: float
    server_cpu: float
    client_cpu: float


def timed(server: ImapServer, call: Callable[[], object]) -> tuple[Timing, object]:
    """Run ``call`` once; its timing and its result."""
    cpu_before = server.cpu_seconds()
    client_before = time.process_time()
    began = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - began
    client_cpu = time.process_time() - client_before
    return Timing(seconds, server.cpu_seconds() - cpu_before, client_cpu), result


# -- checking the answers ---------------------------------------------------------


def check_answer(name: str, server: str, op: str, result: object, box: Mailbox):
    """Raise CheckError unless ``result`` is what the generated mail says."""
    messages = box.messages
    count = len(messages)
    if op == "select":
        if result != count:
            raise CheckError(f"{server} {name}: {result} messages, not {count}")
        return
    if op in ("subject", "unseen", "body"):
        expected = {
            "subject": box.expected_subject_uids,
            "unseen": box.expected_unseen,
            "body": box.expected_body_numbers,
        }[op]()
        if result != expected:
            missing = sorted(set(expected) - set(result))[:10]
            extra = sorted(set(result) - set(expected))[:10]
            raise CheckError(
                f"{server} {name}: {len(result)} found, {len(expected)} expected "
                f"(missing {missing}, unexpected {extra})"
            )
        return
    fetched: list[Fetched] = result  # type: ignore[assignment]
    if [f.seq for f in fetched] != list(range(1, count + 1)):
        raise CheckError(f"{server} {name}: {len(fetched)} answers, not 1..{count}")
    for f, m in zip(fetched, messages, strict=True):
        problem = _fetch_problem(op, f, m)
        if problem:
            raise CheckError(f"{server} {name}: message {f.seq} ({m.name}): {problem}")


def _fetch_problem(op: str, f: Fetched, m: GeneratedMessage) -> str | None:
    """What is wrong with one FETCH answer, or None."""
    if op == "bodies":
        if f.literal is None or _digest(f.literal) != m.digest:
            return "message octets differ from the file's"
        return None
    if f.uid != f.seq:
        return f"UID {f.uid}, expected {f.seq}"
    if f.flags != m.flags:
        return f"FLAGS {sorted(f.flags or ())}, expected {sorted(m.flags)}"
    if f.size != m.size:
        return f"RFC822.SIZE {f.size}, expected {m.size}"
    if f.literal is None or _digest(f.literal) != m.header_digest:
        return "header octets differ from the file's"
    return None


def check_sample(servers: list[ImapServer], box: Mailbox, seed: int) -> int:
    """UID FETCH (BODY.PEEK[]) a sample of messages, one at a time, from each
    server; every copy must be the file's octets.  Returns how many octets
    were compared per server.
    """
    uids = sorted(
        random.Random(seed).sample(
            range(1, len(box.messages) + 1), min(SAMPLE_SIZE, len(box.messages))
        )
    )
    answers = {}
    for server in servers:
        client = connect(server)
        _ok(client.select("INBOX", readonly=True))
        got = []
        for uid in uids:
            fetched = parse_fetch(_ok(client.uid("FETCH", str(uid), "(BODY.PEEK[])")))
            if len(fetched) != 1 or fetched[0].literal is None:
                raise CheckError(f"{server.name}: UID FETCH {uid} gave {fetched!r}")
            got.append(fetched[0].literal)
        client.logout()
        answers[server.name] = got
    first, second = (answers[s.name] for s in servers)
    for uid, a, b in zip(uids, first, second, strict=True):
        original = (box.path / "cur" / box.messages[uid - 1].name).read_bytes()
        if a != b or a != original:
            raise CheckError(
                f"UID {uid}: {servers[0].name} sent {len(a)} octets, "
                f"{servers[1].name} {len(b)}, the file has {len(original)}; "
                f"{'identical' if a == b else 'they differ'}"
            )
    return sum(len(a) for a in first)


# -- the benchmark ----------------------------------------------------------------


@dataclass
class Results:
    """Every timing, by server and operation."""

    cold: dict[str, dict[str, Timing]] = field(default_factory=dict)
    rounds: dict[str, dict[str, list[Timing]]] = field(default_factory=dict)

    def add(self, server: str, op: str, timing: Timing) -> None:
        self.rounds.setdefault(server, {}).setdefault(op, []).append(timing)

    def median(self, server: str, op: str, what: str = "seconds") -> float:
        return statistics.median(getattr(t, what) for t in self.rounds[server][op])


def warm_up(server: ImapServer, results: Results, box: Mailbox) -> None:
    """The first open: SELECT without uidlist or index, then FETCH 1:* (FLAGS)."""
    client = connect(server)
    select, exists = timed(server, lambda: op_select(client))
    check_answer("cold SELECT", server.name, "select", exists, box)
    flags, count = timed(server, lambda: op_fetch_flags(client))
    if count != len(box.messages):
        raise CheckError(f"{server.name} cold FETCH (FLAGS): {count} answers")
    client.logout()
    results.cold[server.name] = {"select": select, "flags": flags}


def run_round(server: ImapServer, results: Results, box: Mailbox) -> None:
    """One warm open: a new session (login not timed), then each operation."""
    client = connect(server)
    for op, name in OPERATIONS:
        call = _CLIENT_OPS[op]
        timing, answer = timed(server, lambda call=call: call(client))
        check_answer(name, server.name, op, answer, box)
        results.add(server.name, op, timing)
        del answer
    client.logout()


def memory_reading(
    folder: Path, config: Path, port: int, user: str, count: int
) -> tuple[int, int]:
    """VmRSS of a fresh PowerMail before and after ``user`` selects INBOX.

    The reading is taken while INBOX is still selected, after SELECT and
    FETCH 1:* (FLAGS).
    """
    server = start_powermail(folder, config, port, f"PowerMail-rss-{count}")
    view = ImapServer(server.name, port, server.cpu_seconds)
    try:
        client = connect(view, user)
        before = server.memory()["VmRSS"]
        if op_select(client) != count or op_fetch_flags(client) != count:
            raise CheckError(f"{user}'s INBOX does not hold {count} messages")
        after = server.memory()["VmRSS"]
        client.logout()
    finally:
        server.stop()
    return before, after


def _seconds(value: float) -> str:
    return f"{value:10.4f}" if value < 100 else f"{value:10.1f}"


def print_tables(results: Results, names: tuple[str, str]) -> None:
    """The cold and the warm table, then every round's figures."""
    pm, dc = names
    print()
    print("First open, cold: a fresh copy of the Maildir, no dovecot-uidlist and no")
    print("dovecot.index* yet; the SELECT writes them.  The message files are in the")
    print("page cache (they were just written).  Wall clock seconds:")
    print(f"  {'operation':<52}{pm:>10}{dc:>10}{'PM/DC':>8}")
    for op, name in (
        ("select", "SELECT INBOX (assigns every UID)"),
        ("flags", "FETCH 1:* (FLAGS)"),
    ):
        a, b = results.cold[pm][op].seconds, results.cold[dc][op].seconds
        print(f"  {name:<52}{_seconds(a)}{_seconds(b)}{a / b:8.1f}")

    rounds = len(results.rounds[pm]["select"])
    print()
    print(f"Warm: median of {rounds} rounds.  Each round is a new session (LOGIN not")
    print("timed) on a Maildir both servers opened before: UIDs assigned, PowerMail's")
    print("dovecot-uidlist and Dovecot's dovecot-uidlist and dovecot.index* written.")
    print(
        f"  {'':<52}{'wall clock seconds':^28}{'server CPU s':>18}{'client CPU s':>18}"
    )
    print(
        f"  {'operation':<52}{pm:>10}{dc:>10}{'PM/DC':>8}{pm:>10}{dc:>8}{pm:>10}{dc:>8}"
    )
    for op, name in OPERATIONS:
        a, b = results.median(pm, op), results.median(dc, op)
        print(
            f"  {name:<52}{_seconds(a)}{_seconds(b)}{a / b:8.1f}"
            f"{results.median(pm, op, 'server_cpu'):10.2f}"
            f"{results.median(dc, op, 'server_cpu'):8.2f}"
            f"{results.median(pm, op, 'client_cpu'):10.2f}"
            f"{results.median(dc, op, 'client_cpu'):8.2f}"
        )
    print("  wall clock seconds of every round:")
    for op, _ in OPERATIONS:
        line = "   ".join(
            f"{server} "
            + " ".join(f"{t.seconds:.4f}" for t in results.rounds[server][op])
            for server in names
        )
        print(f"    {op:<8} {line}")


def benchmark(args: argparse.Namespace) -> int:
    """Build the Maildir, start both servers, run everything; 0 if all held."""
    began = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="powermail-bench-imap-"))
    print(f"work folder: {folder}")
    print(f"powermail package: {which_powermail()}")
    version = subprocess.run(
        [str(DOVECOT), "--version"], capture_output=True, text=True, check=False
    )
    print(f"dovecot: {version.stdout.strip()}")

    box = build_mailbox(folder / "source" / "Maildir", args.messages, args.seed)
    print(f"mailbox (seed {args.seed}, built in {box.seconds:.1f} s): {box.describe()}")
    small = min(SMALL_MAILBOX, max(1, args.messages // 10))

    pm_folder = folder / "powermail"
    pm_folder.mkdir()
    config, pm_port = write_config(pm_folder, hash_password(PASSWORD))
    copy_mailbox(box, powermail_maildir(pm_folder, USER))
    copy_mailbox(box, powermail_maildir(pm_folder, SMALL_USER), small)
    dc_folder = folder / "dovecot"
    copy_mailbox(box, dc_folder / "Maildir")

    powermail: Server | None = None
    dovecot: DovecotProcess | None = None
    failed = False
    results = Results()
    try:
        powermail = start_powermail(pm_folder, config, pm_port, "PowerMail")
        dovecot = start_dovecot(
            dc_folder, dc_folder / "Maildir", user=USER, password=PASSWORD
        )
        servers = [
            ImapServer("PowerMail", pm_port, powermail.cpu_seconds),
            ImapServer(
                "Dovecot",
                dovecot.port,
                lambda: session_cpu_seconds(dovecot.process.pid),
            ),
        ]
        rss_start = powermail.memory()["VmRSS"]
        for server in servers:
            warm_up(server, results, box)
        rss_warm = powermail.memory()["VmRSS"]
        # bob's mailbox gets its uidlist now, so the memory readings below
        # both open a mailbox that was opened before.
        client = connect(servers[0], SMALL_USER)
        op_select(client)
        op_fetch_flags(client)
        client.logout()

        for number in range(1, args.rounds + 1):
            for server in servers:
                run_round(server, results, box)
            print(f"round {number} done ({time.monotonic() - began:.0f} s)", flush=True)
        rss_end = powermail.memory()["VmRSS"]
        octets = check_sample(servers, box, args.seed)
        print_tables(results, ("PowerMail", "Dovecot"))
        print()
        print(
            f"Checked: both servers gave {len(box.messages)} messages with the "
            f"files' UID order, flags, sizes, header and message octets in every "
            f"round, the search results expected, and the same {SAMPLE_SIZE} "
            f"messages ({octets} octets) fetched one at a time, octet for octet."
        )
        print(
            f"PowerMail RSS in this run: {rss_start / MiB:.1f} MiB at start, "
            f"{rss_warm / MiB:.1f} MiB after the cold SELECT, "
            f"{rss_end / MiB:.1f} MiB after the timed rounds"
        )
        powermail.stop()
        powermail = None

        print()
        print("PowerMail memory, fresh process each, INBOX selected (opened before),")
        print("after SELECT and FETCH 1:* (FLAGS):")
        readings = {}
        for user, count in ((SMALL_USER, small), (USER, args.messages)):
            before, after = memory_reading(pm_folder, config, pm_port, user, count)
            readings[count] = after
            print(
                f"  {count:6d} messages: VmRSS {after / MiB:6.1f} MiB "
                f"({before / MiB:.1f} MiB after login, before SELECT)"
            )
        difference = readings[args.messages] - readings[small]
        verdict = "PASS" if difference <= RSS_BUDGET else "FAIL"
        print(
            f"  difference {difference / MiB:.1f} MiB for {args.messages - small} more "
            f"messages ({difference / max(args.messages - small, 1):.0f} octets "
            f"each); limit {RSS_BUDGET / MiB:.0f} MiB: {verdict}"
        )
        if small != SMALL_MAILBOX or args.messages != 10000:
            print("  (the limit is set for 1,000 against 10,000 messages)")
        failed = verdict == "FAIL"
    except (CheckError, RuntimeError, OSError, imaplib.IMAP4.error) as exc:
        failed = True
        sys.stdout.flush()
        print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        if powermail is not None:
            print(f"--- tail of {powermail.log_path}", file=sys.stderr)
            print(log_tail(powermail.log_path), file=sys.stderr)
    finally:
        if powermail is not None:
            code = powermail.stop()
            if code not in (0, -signal.SIGTERM):
                print(f"PowerMail exited with {code}", file=sys.stderr)
                failed = True
        if dovecot is not None:
            dovecot.stop()

    print()
    for log in sorted(pm_folder.glob("*.log")):
        problems = log_problems(log)
        print(f"{log.name}: {len(problems)} warning/error lines")
        for line in problems[:10]:
            print(f"  {line}")
    if dovecot is not None:
        problems = dovecot_problems(dovecot)
        print(f"dovecot.log: {len(problems)} warning/error lines")
        for line in problems[:10]:
            print(f"  {line}")
    print(f"total time {time.monotonic() - began:.0f} s")
    if failed or args.keep:
        print(f"kept {folder}")
    else:
        shutil.rmtree(folder)
    return 1 if failed else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--messages",
        type=int,
        default=10000,
        help="messages in the mailbox (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the generator (default: 1)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder and its logs"
    )
    args = parser.parse_args(argv)
    if args.messages < 10 or args.rounds < 1:
        parser.error("--messages must be at least 10 and --rounds at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark if this machine can run Dovecot; the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not dovecot_available():
        print(
            "needs /usr/sbin/dovecot and root (Dovecot's mail process runs as nobody)",
            file=sys.stderr,
        )
        return 2
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
