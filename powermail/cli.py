"""The ``powermail`` administrator command: check and edit ``powermail.toml``.

Edits go through powermail.config.editor, so the file keeps its comments, is
validated as the server would load it, and is replaced atomically.  Errors are
one line on stderr and exit status 1; a usage error exits with status 2.
Passwords and their hashes are never printed.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tomlkit.toml_document import TOMLDocument

from powermail import __version__
from powermail.address import AddressError, normalise_domain
from powermail.config import ConfigError, load_config
from powermail.config._schema import MAILBOX_MODES
from powermail.config.editor import (
    EditError,
    add_alias,
    add_domain,
    add_mailbox,
    edit_file,
    remove_alias,
    remove_domain,
    remove_mailbox,
    set_password,
)
from powermail.passwords import hash_password

__all__ = ["CommandError", "main"]

DEFAULT_CONFIG = "conf/powermail.toml"


class CommandError(Exception):
    """A command that cannot go on, for a reason given in one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``powermail`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 1 on an error, 2 on a usage error.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
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
        description="Check and edit the PowerMail configuration.",
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
        "create a mailbox; its password is the first line of standard input, "
        "or asked twice on a terminal",
    )
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--mode", choices=MAILBOX_MODES, default="local")
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

    return parser


def _group(commands: Any, name: str, about: str) -> Any:
    parser = commands.add_parser(name, help=about, description=about)
    return parser.add_subparsers(metavar="ACTION", required=True)


def _command(
    commands: Any, name: str, run: Callable[[argparse.Namespace], int], about: str
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=about, description=about)
    parser.set_defaults(run=run)
    return parser


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


def _mailbox_add(args: argparse.Namespace) -> int:
    return _edit(
        args,
        lambda document: add_mailbox(
            document,
            args.address,
            mode=args.mode,
            new_password_hash=_password_hash_source(args.address),
        ),
    )


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

    width = max((len(str(m.address)) for m in mailboxes), default=0)
    for mailbox in mailboxes:
        print(f"{str(mailbox.address):<{width}}  {mailbox.mode}")
    return 0


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
