"""The ``powermail`` administrator command: edit the configuration, run the queue.

Edits go through powermail.config.editor, so the file keeps its comments, is
validated as the server would load it, and is replaced atomically.  ``queue``
commands talk to the running server over its control socket (see
powermail.control).  Errors are one line on stderr and exit status 1; a usage
error exits with status 2.  Passwords and their hashes are never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tomlkit.toml_document import TOMLDocument

from powermail import __version__
from powermail.address import AddressError, normalise_domain
from powermail.config import ConfigError, load_config
from powermail.config._schema import MAILBOX_MODES, NEXT_HOP_TLS
from powermail.config.editor import (
    EditError,
    add_alias,
    add_domain,
    add_mailbox,
    edit_file,
    remove_alias,
    remove_domain,
    remove_mailbox,
    set_mailbox,
    set_password,
)
from powermail.directory import Mailbox
from powermail.passwords import hash_password

__all__ = ["CommandError", "main"]

DEFAULT_CONFIG = "conf/powermail.toml"

#: Seconds to wait for the server's answer on the control socket.
CONTROL_TIMEOUT = 10.0


class CommandError(Exception):
    """A command that cannot go on, for a reason given in one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``powermail`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 1 on an error, 2 on a usage error.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        args.check(args)
    except SystemExit as exc:
        # argparse has already printed the help, the version or the error.
        return exc.code if isinstance(exc.code, int) else 0

    try:
        return args.run(args)
    except (ConfigError, EditError, CommandError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        return _fail("interrupted")


def _fail(message: str) -> int:
    print(f"powermail: {message}", file=sys.stderr)
    return 1


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``powermail:`` line."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("powermail").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"powermail: {where}{message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="powermail",
        description="Check and edit the PowerMail configuration, and manage the "
        "running server's queue.",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=DEFAULT_CONFIG,
        help=f"the configuration file (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(metavar="COMMAND", required=True)
    _command(commands, "check", _check, "validate the configuration file")

    domain = _group(commands, "domain", "manage hosted domains")
    add = _command(domain, "add", _domain_add, "host a new domain")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--postmaster",
        metavar="ADDRESS",
        required=True,
        help="where postmaster@NAME and abuse@NAME go; an address in NAME is "
        "created as a local mailbox, its password read as for `mailbox add`",
    )
    remove = _command(
        domain,
        "remove",
        _domain_remove,
        "stop hosting a domain and drop its mailboxes and aliases; mail on disk "
        "is left in place",
    )
    remove.add_argument("name", metavar="NAME")
    _command(domain, "list", _domain_list, "list the hosted domains")

    mailbox = _group(commands, "mailbox", "manage mailboxes and their passwords")
    add = _command(
        mailbox,
        "add",
        _mailbox_add,
        "create a mailbox; a local one's password is the first line of standard "
        "input, or asked twice on a terminal",
        check=_check_mailbox_add,
    )
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument(
        "--mode",
        choices=MAILBOX_MODES,
        default="local",
        help="local: stored here (the default); redirect: sent on to --next-hop",
    )
    _next_hop_options(add)
    add.add_argument(
        "--password",
        action="store_true",
        help="give a redirect mailbox a password too, read as for a local one",
    )
    change = _command(
        mailbox,
        "set",
        _mailbox_set,
        "change a mailbox's mode, next hop or catch-all role; what is not given "
        "stays as it is",
        check=_check_mailbox_set,
    )
    change.add_argument("address", metavar="ADDRESS")
    change.add_argument(
        "--mode",
        choices=MAILBOX_MODES,
        help="local drops the next hop, its TLS policy and recipient verification",
    )
    _next_hop_options(change)
    change.add_argument(
        "--catch-all",
        action=argparse.BooleanOptionalAction,
        help="make this mailbox take its domain's unknown local parts, in place of "
        "any other; --no-catch-all stops it",
    )
    change.add_argument(
        "--verify-recipients",
        action=argparse.BooleanOptionalAction,
        help="a redirect catch-all asks its next hop whether a recipient exists "
        "before accepting it",
    )
    remove = _command(
        mailbox,
        "remove",
        _mailbox_remove,
        "delete a mailbox and take it out of aliases; mail on disk is left in place",
    )
    remove.add_argument("address", metavar="ADDRESS")
    listing = _command(
        mailbox, "list", _mailbox_list, "list mailboxes, all or of one domain"
    )
    listing.add_argument("domain", metavar="DOMAIN", nargs="?")
    passwd = _command(
        mailbox,
        "passwd",
        _mailbox_passwd,
        "set a mailbox's password, read as for `mailbox add`",
    )
    passwd.add_argument("address", metavar="ADDRESS")

    alias = _group(commands, "alias", "manage aliases and their targets")
    for name, run, about in (
        ("add", _alias_add, "make ALIAS also go to TARGET, creating ALIAS if new"),
        ("remove", _alias_remove, "stop ALIAS going to TARGET; drop ALIAS if empty"),
    ):
        command = _command(alias, name, run, about)
        command.add_argument("alias", metavar="ALIAS")
        command.add_argument("target", metavar="TARGET")

    queue = _group(
        commands, "queue", "look at and act on the running server's outbound queue"
    )
    listing = _command(queue, "list", _queue_list, "list the queued messages")
    listing.add_argument("--json", action="store_true", help="print the raw answer")
    show = _command(queue, "show", _queue_show, "show everything about one message")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print the raw answer")
    retry = _command(
        queue, "retry", _queue_retry, "attempt one message now, or all without ID"
    )
    retry.add_argument("id", metavar="ID", nargs="?")
    for name, about in (
        ("hold", "stop attempting a message until it is released"),
        ("release", "attempt a held message again on its schedule"),
        ("delete", "drop a message from the queue without telling its sender"),
    ):
        command = _command(queue, name, _queue_action, about)
        command.add_argument("id", metavar="ID")
        command.set_defaults(action=name)

    return parser


def _group(commands: Any, name: str, about: str) -> Any:
    parser = commands.add_parser(name, help=about, description=about)
    return parser.add_subparsers(metavar="ACTION", required=True)


def _command(
    commands: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    about: str,
    *,
    check: Callable[[argparse.Namespace], None] | None = None,
) -> argparse.ArgumentParser:
    """A command that ``run`` carries out once ``check`` found its options sane.

    ``check`` makes the cross-checks argparse cannot, with ``args.parser``
    to report a usage error.
    """
    parser = commands.add_parser(name, help=about, description=about)
    parser.set_defaults(run=run, check=check or (lambda args: None), parser=parser)
    return parser


def _next_hop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--next-hop",
        metavar="HOP",
        help="where a redirect mailbox's mail goes: 'host' or 'host:port' (MX "
        "looked up), '[host]' or '[host]:port' (no MX lookup), or an IP address",
    )
    parser.add_argument(
        "--next-hop-tls",
        choices=NEXT_HOP_TLS,
        help="TLS to the next hop (default: opportunistic)",
    )


# -- Commands -----------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    directory = config.directory
    print(
        f"{config.path}: OK ({_count(len(directory.domains), 'domain')}, "
        f"{_count(len(directory.mailboxes), 'mailbox', 'mailboxes')}, "
        f"{_count(len(directory.aliases), 'alias', 'aliases')})"
    )
    return 0


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else (many or one + 's')}"


def _domain_add(args: argparse.Namespace) -> int:
    return _edit(
        args,
        lambda document: add_domain(
            document,
            args.name,
            postmaster=args.postmaster,
            new_password_hash=_password_hash_source(args.postmaster),
        ),
    )


def _domain_remove(args: argparse.Namespace) -> int:
    return _edit(args, lambda document: remove_domain(document, args.name))


def _domain_list(args: argparse.Namespace) -> int:
    for domain in load_config(args.config).directory.domains:
        print(domain)
    return 0


def _check_mailbox_add(args: argparse.Namespace) -> None:
    if args.mode == "redirect" and args.next_hop is None:
        args.parser.error("a redirect mailbox needs --next-hop HOP")
    if args.mode == "local" and (args.next_hop, args.next_hop_tls) != (None, None):
        args.parser.error("--next-hop and --next-hop-tls need --mode redirect")


def _mailbox_add(args: argparse.Namespace) -> int:
    wants_password = args.mode == "local" or args.password
    return _edit(
        args,
        lambda document: add_mailbox(
            document,
            args.address,
            mode=args.mode,
            next_hop=args.next_hop,
            next_hop_tls=args.next_hop_tls,
            new_password_hash=(
                _password_hash_source(args.address) if wants_password else None
            ),
        ),
    )


_SETTINGS = ("mode", "next_hop", "next_hop_tls", "catch_all", "verify_recipients")


def _check_mailbox_set(args: argparse.Namespace) -> None:
    if all(getattr(args, name) is None for name in _SETTINGS):
        args.parser.error(
            "nothing to change: give --mode, --next-hop, --next-hop-tls, "
            "--[no-]catch-all or --[no-]verify-recipients"
        )


def _mailbox_set(args: argparse.Namespace) -> int:
    settings = {name: getattr(args, name) for name in _SETTINGS}
    return _edit(args, lambda document: set_mailbox(document, args.address, **settings))


def _mailbox_remove(args: argparse.Namespace) -> int:
    return _edit(args, lambda document: remove_mailbox(document, args.address))


def _mailbox_list(args: argparse.Namespace) -> int:
    directory = load_config(args.config).directory
    mailboxes = list(directory.mailboxes.values())
    if args.domain is not None:
        try:
            domain = normalise_domain(args.domain)
        except AddressError as exc:
            raise CommandError(
                f"invalid domain {args.domain!r}: {exc.reason}"
            ) from None
        if domain not in directory.domains:
            raise CommandError(f"no such domain {domain}")
        mailboxes = [m for m in mailboxes if m.address.domain == domain]

    catch_alls = {d.catch_all for d in directory.domains.values() if d.catch_all}
    width = max((len(str(m.address)) for m in mailboxes), default=0)
    for mailbox in mailboxes:
        print(f"{str(mailbox.address):<{width}}  {_describe(mailbox, catch_alls)}")
    return 0


def _describe(mailbox: Mailbox, catch_alls: set[str]) -> str:
    """How ``mailbox list`` shows a mailbox: its mode, next hop and roles."""
    parts = [mailbox.mode]
    if mailbox.mode == "redirect":
        parts[0] += f" to {mailbox.next_hop}"
        if mailbox.next_hop_tls != "opportunistic":
            parts.append(f"TLS {mailbox.next_hop_tls}")
    if mailbox.key in catch_alls:
        parts.append("catch-all")
    if mailbox.verify_recipients:
        parts.append("verifies recipients")
    return ", ".join(parts)


def _mailbox_passwd(args: argparse.Namespace) -> int:
    return _edit(
        args,
        lambda document: set_password(
            document,
            args.address,
            new_password_hash=_password_hash_source(args.address),
        ),
    )


def _alias_add(args: argparse.Namespace) -> int:
    return _edit(args, lambda document: add_alias(document, args.alias, args.target))


def _alias_remove(args: argparse.Namespace) -> int:
    return _edit(args, lambda document: remove_alias(document, args.alias, args.target))


def _edit(args: argparse.Namespace, edit: Callable[[TOMLDocument], list[str]]) -> int:
    for line in edit_file(args.config, edit):
        print(line)
    return 0


# -- The running server's queue -------------------------------------------------


def _queue_list(args: argparse.Namespace) -> int:
    messages = _ask_server(args, {"command": "queue.list"})
    if args.json:
        _print_json(messages)
    elif not messages:
        print("queue is empty")
    else:
        with _answer_checked(messages):
            rows = [_summary(message, time.time()) for message in messages]
        _print_columns(rows)
    return 0


def _summary(message: dict[str, Any], now: float) -> list[str]:
    """The cells of one message's line in ``queue list``."""
    pending = [
        r["address"] for r in message["recipients"] if r.get("state") == "pending"
    ]
    return [
        str(message["id"]),
        _size(message["size"]),
        f"age {_duration(now - message['created'])}",
        f"next {_when(message['next_attempt'], now)}",
        "held" if message.get("held") else "",
        f"<{message['sender']}>",
        ", ".join(pending) or "-",
    ]


def _print_columns(rows: list[list[str]]) -> None:
    # A column nobody has (no message held) is left out, not shown blank.
    columns = [column for column in zip(*rows, strict=True) if any(column)]
    widths = [max(map(len, column)) for column in columns]
    for row in zip(*columns, strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


#: How ``queue show`` labels and writes the fields it knows; others come plain.
_SHOWN: dict[str, tuple[str, Callable[[Any, float], str]]] = {
    "sender": ("sender", lambda value, now: f"<{value}>"),
    "size": ("size", lambda value, now: f"{value} octets ({_size(value)})"),
    "created": (
        "created",
        lambda value, now: f"{_timestamp(value)} ({_duration(now - value)} ago)",
    ),
    "next_attempt": (
        "next attempt",
        lambda value, now: f"{_timestamp(value)} ({_when(value, now)})",
    ),
}


def _queue_show(args: argparse.Namespace) -> int:
    message = _ask_server(args, {"command": "queue.show", "id": args.id})
    if args.json:
        _print_json(message)
        return 0

    with _answer_checked(message):
        lines = _details(message, time.time())
    print("\n".join(lines))
    return 0


def _details(message: dict[str, Any], now: float) -> list[str]:
    """The lines of ``queue show``: the message's fields, then each recipient's."""
    lines = []
    for name, value in message.items():
        if name != "recipients":
            label, show = _SHOWN.get(name, (name.replace("_", " "), _plain))
            lines.append(f"{label}: {show(value, now)}")
    for recipient in message.get("recipients", []):
        details = dict(recipient)
        lines.append(f"recipient: {details.pop('address')}")
        lines.extend(
            f"  {name.replace('_', ' ')}: {_plain(value)}"
            for name, value in details.items()
        )
    return lines


@contextlib.contextmanager
def _answer_checked(answer: Any) -> Iterator[None]:
    """Turn a server's answer of an unexpected shape into one error line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CommandError(
            f"unexpected answer from the server: {json.dumps(answer):.200}"
        ) from None


def _queue_retry(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"command": "queue.retry"}
    if args.id is not None:
        request["id"] = args.id
    retried = _ask_server(args, request)
    if isinstance(retried, str):
        retried = [retried]
    if not retried:
        print("queue is empty")
    for msg_id in retried or []:
        print(f"retrying {msg_id}")
    return 0


_DONE = {"hold": "held", "release": "released", "delete": "deleted"}


def _queue_action(args: argparse.Namespace) -> int:
    result = _ask_server(args, {"command": f"queue.{args.action}", "id": args.id})
    print(f"{_DONE[args.action]} {result if isinstance(result, str) else args.id}")
    return 0


def _ask_server(args: argparse.Namespace, request: dict[str, Any]) -> Any:
    """Send ``request`` to the server of ``args.config``; the answer's result."""
    path = load_config(args.config).server.data_dir / "control.sock"
    answer = _control_request(path, request)
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise CommandError(f"unexpected answer from the server: {answer!r:.200}")
    if not answer["ok"]:
        raise CommandError(str(answer.get("error") or "the server refused"))
    return answer.get("result")


def _control_request(path: Path, request: dict[str, Any]) -> Any:
    """One request line to the control socket at ``path``, one answer line back."""
    # sockaddr_un holds 108 octets, the final NUL included.
    if len(os.fsencode(path)) > 107:
        raise CommandError(f"control socket path too long for a UNIX socket: {path}")

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONTROL_TIMEOUT)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise CommandError(
                f"the server is not running (no control socket at {path})"
            ) from None
        except PermissionError:
            raise CommandError(
                f"{path}: permission denied (run this as the server's user)"
            ) from None

        try:
            sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
            line = _read_line(sock)
        except TimeoutError:
            raise CommandError(
                f"the server did not answer within {CONTROL_TIMEOUT:g} seconds"
            ) from None
        except OSError as exc:
            raise CommandError(
                f"lost the connection to the server: {exc.strerror or exc}"
            ) from None

    try:
        return json.loads(line)
    except ValueError:
        raise CommandError(
            f"unexpected answer from the server: {line!r:.200}"
        ) from None


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise CommandError("the server closed the connection without answering")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)


def _print_json(result: Any) -> None:
    print(json.dumps(result, indent=2, ensure_ascii=False))


def _plain(value: Any, now: float = 0.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _duration(seconds: float) -> str:
    """``seconds`` as a person says it, to the two largest units: "3h12m"."""
    left = max(0, int(seconds))
    if left < 60:
        return f"{left}s"
    for unit, size, smaller, small_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "m", 60),
    ):
        if left >= size:
            rest = (left % size) // small_size
            return f"{left // size}{unit}" + (f"{rest}{smaller}" if rest else "")
    return f"{left // 60}m"


def _when(epoch: float, now: float) -> str:
    return "now" if epoch <= now else f"in {_duration(epoch - now)}"


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def _size(octets: int) -> str:
    if octets < 1024:
        return f"{octets} B"
    if octets < 1024 * 1024:
        return f"{octets / 1024:.1f} KiB"
    return f"{octets / (1024 * 1024):.1f} MiB"


# -- Passwords ----------------------------------------------------------------


def _password_hash_source(address: str) -> Callable[[], str]:
    """What the editor calls, once the change is possible, for the new hash."""
    return lambda: hash_password(_read_password(address))


def _read_password(address: str) -> str:
    """The new password: asked twice on a terminal, else stdin's first line."""
    stdin = sys.stdin
    if stdin is None:
        raise CommandError("no standard input to read the password from")
    if stdin.isatty():
        try:
            password = getpass.getpass(f"New password for {address}: ")
            again = getpass.getpass("Repeat it: ")
        except EOFError:
            raise CommandError("no password given") from None
        if again != password:
            raise CommandError("the two passwords differ")
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise CommandError("empty password refused")
    return password


if __name__ == "__main__":
    sys.exit(main())
