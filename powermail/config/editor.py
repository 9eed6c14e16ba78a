"""Edits of ``powermail.toml`` that keep the administrator's comments and layout.

Each edit takes a tomlkit document, checks that the change makes sense and
raises EditError before touching anything if it does not.  ``edit_file`` runs
one edit on a file: it validates the new text exactly as the server would load
it and replaces the file atomically, so a refused change leaves it untouched.

Addresses and domain names are matched as the configuration compares them
(case-folded local parts, A-label domains), whatever their spelling in the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Comment, Item, Null, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

from powermail.address import Address, AddressError, normalise_domain, parse_address
from powermail.config._loader import (
    REQUIRED_ALIASES,
    ConfigError,
    parse_config,
    read_config_text,
)
from powermail.config._schema import MAILBOX_KEYS, MAILBOX_MODES, NEXT_HOP_TLS

__all__ = [
    "EditError",
    "PasswordSource",
    "add_alias",
    "add_domain",
    "add_mailbox",
    "edit_file",
    "remove_alias",
    "remove_domain",
    "remove_mailbox",
    "set_mailbox",
    "set_password",
    "write_atomically",
]

_T = TypeVar("_T")

_DEFAULT_TLS = MAILBOX_KEYS["next_hop_tls"].default

#: Called once a change is known to be possible, to get the hash to store.
PasswordSource = Callable[[], str]


class EditError(Exception):
    """A change refused before anything was written; ``str()`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- Reading and writing the file ---------------------------------------------


def edit_file(path: str | Path, edit: Callable[[TOMLDocument], _T]) -> _T:
    """Apply ``edit`` to the file at ``path`` if the result is a valid config.

    ``edit`` changes the document it is given and returns what the caller
    wants to report.  EditError from ``edit``, or ConfigError when the new
    text does not validate, leaves the file exactly as it was.  Two edits of
    one file run one after the other, so that neither undoes the other.
    """
    path = Path(path).absolute()
    with _editing(path):
        text = read_config_text(path)
        try:
            document = tomlkit.parse(text)
        except TOMLKitError as exc:
            raise ConfigError(path, "(syntax)", str(exc)) from None

        result = edit(document)

        new_text = tomlkit.dumps(document)
        parse_config(new_text, path)
        write_atomically(path, new_text)
    return result


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[None]:
    # The file itself is replaced by each edit, so the lock is on its folder.
    folder = Path(os.path.realpath(path)).parent
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "no such file") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomically(path: str | Path, text: str) -> None:
    """Replace the file at ``path`` with ``text`` so that no reader sees half.

    The new content goes to a temporary file in the same folder, reaches the
    disk, and is renamed over the old file, which keeps its mode and, where
    permitted, its owner.  A symbolic link is followed, not replaced.
    """
    target = Path(os.path.realpath(path))
    folder = target.parent
    old = os.stat(target)

    fd, temp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=folder
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as temp:
            temp.write(text)
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, stat.S_IMODE(old.st_mode))
        if (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
            # Only root may give a file away; anyone else keeps their own.
            with contextlib.suppress(PermissionError):
                os.chown(temp_name, old.st_uid, old.st_gid)
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise

    # The rename is only durable once the folder itself is on disk.
    folder_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


# -- The edits ------------------------------------------------------------------


def add_domain(
    document: TOMLDocument,
    name: str,
    *,
    postmaster: str,
    new_password_hash: PasswordSource,
) -> list[str]:
    """Host domain ``name``, its postmaster and abuse going to ``postmaster``.

    When ``postmaster`` belongs to the new domain it is created as a local
    mailbox, with the hash ``new_password_hash`` returns.  Returns one line
    per change made.
    """
    entries = _Entries.read(document)
    domain = _domain(name)
    if domain in entries.domains:
        raise EditError(f"domain {domain} already exists")
    target = _address(postmaster)
    if target.domain != domain:
        entries.require_known_target(target)
    # Left-overs of an earlier domain of this name would clash with ours.
    ours = {f"{local}@{domain}" for local in REQUIRED_ALIASES}
    if target.domain == domain:
        ours.add(target.key)
    for key in sorted(ours):
        if key in entries.mailboxes or key in entries.aliases:
            raise EditError(f"{key} is already in the file; remove it first")

    changes = [f"added domain {domain}"]
    _add_entry(document, "domains", domain, tomlkit.table())
    if target.domain == domain:
        _add_entry(
            document,
            "mailboxes",
            str(target),
            _mailbox_table("local", new_password_hash()),
        )
        changes.append(f"added mailbox {target} (local)")
    for local in REQUIRED_ALIASES:
        alias = Address(local, domain)
        if alias.key == target.key:
            continue
        _add_entry(document, "aliases", str(alias), tomlkit.item([str(target)]))
        changes.append(f"added alias {alias} -> {target}")
    return changes


def remove_domain(document: TOMLDocument, name: str) -> list[str]:
    """Stop hosting ``name``: drop it, its mailboxes and its aliases.

    Aliases of other domains lose their targets in ``name``; one left with no
    target is dropped too, unless it is a postmaster or abuse address.
    """
    entries = _Entries.read(document)
    domain = _domain(name)
    if domain not in entries.domains:
        raise EditError(f"no such domain {domain}")
    mailboxes = [m for m in entries.mailboxes.values() if m.address.domain == domain]
    aliases = [a for a in entries.aliases.values() if a.address.domain == domain]
    gone = {entry.address.key for entry in [*mailboxes, *aliases]}
    plan = entries.plan_removal(gone, cause=f"removing domain {domain}")

    _remove_entry(document, "domains", entries.domains[domain])
    for mailbox in mailboxes:
        _remove_entry(document, "mailboxes", mailbox.text)
    for alias in aliases:
        _remove_entry(document, "aliases", alias.text)
    plan.apply(document)

    return [
        f"removed domain {domain} with {_count(mailboxes, 'mailbox', 'mailboxes')}"
        f" and {_count(aliases, 'alias', 'aliases')}",
        *plan.changes(),
        f"mail stored on disk for {domain} was left in place",
    ]


def add_mailbox(
    document: TOMLDocument,
    address: str,
    *,
    mode: str = "local",
    next_hop: str | None = None,
    next_hop_tls: str | None = None,
    new_password_hash: PasswordSource | None = None,
) -> list[str]:
    """Create mailbox ``address``; a redirect one sends its mail to ``next_hop``.

    ``new_password_hash``, when given, is called for the hash to store; a
    redirect mailbox usually has none.  ``next_hop_tls`` is only written when
    it is not the default.
    """
    entries = _Entries.read(document)
    mailbox = _address(address)
    if mailbox.domain not in entries.domains:
        raise EditError(f"no such domain {mailbox.domain}")
    if mailbox.key in entries.mailboxes:
        raise EditError(f"{mailbox} is already a mailbox")
    if mailbox.key in entries.aliases:
        raise EditError(f"{mailbox} is already an alias")
    _check_mode(mode)
    _check_next_hop(next_hop)
    _check_tls(next_hop_tls)
    if mode == "redirect" and next_hop is None:
        raise EditError("a redirect mailbox needs a next hop")
    if mode == "local" and (next_hop is not None or next_hop_tls is not None):
        raise EditError("only a redirect mailbox has a next hop")

    password_hash = new_password_hash() if new_password_hash is not None else None
    table = _mailbox_table(mode, password_hash, next_hop, next_hop_tls)
    _add_entry(document, "mailboxes", str(mailbox), table)
    if mode == "local":
        return [f"added mailbox {mailbox} (local)"]
    tls = "" if next_hop_tls in (None, _DEFAULT_TLS) else f", TLS {next_hop_tls}"
    return [f"added mailbox {mailbox} (redirect to {next_hop}{tls})"]


def set_mailbox(
    document: TOMLDocument,
    address: str,
    *,
    mode: str | None = None,
    next_hop: str | None = None,
    next_hop_tls: str | None = None,
    catch_all: bool | None = None,
    verify_recipients: bool | None = None,
) -> list[str]:
    """Change what is given of mailbox ``address``'s settings; None keeps one.

    A mailbox made local loses its next hop, TLS policy and recipient
    verification.  ``catch_all=True`` makes it its domain's catch-all in place
    of any other, which then stops verifying recipients; ``catch_all=False``
    takes the role away only from this mailbox.  Returns one line per change.
    """
    entries = _Entries.read(document)
    mailbox = entries.mailbox(_address(address))
    name = mailbox.address
    settings = mailbox.settings
    _check_mode(mode)
    _check_next_hop(next_hop)
    _check_tls(next_hop_tls)
    old_mode = settings.get("mode", "local")
    new_mode = mode or old_mode
    if new_mode == "local":
        for given, what in (
            (next_hop, "a next hop"),
            (next_hop_tls, "a next hop TLS policy"),
            (verify_recipients or None, "recipient verification"),
        ):
            if given is not None:
                state = "is" if old_mode == "local" else "would be"
                raise EditError(
                    f"only a redirect mailbox has {what}, and {name} {state} local"
                )
    elif not (next_hop or settings.get("next_hop")):
        raise EditError(f"{name} needs a next hop to be a redirect mailbox")

    _container, item = _find_entry(document, "mailboxes", mailbox.text)
    changes = _change_delivery(
        item, mailbox, mode=new_mode, next_hop=next_hop, next_hop_tls=next_hop_tls
    )
    if catch_all is not None:
        lines = _change_catch_all(document, entries, mailbox, catch_all)
        # Only a catch-all may verify recipients: one that stops being it stops.
        if not catch_all and lines and verify_recipients is None:
            verify_recipients = False
        changes += lines

    was_verifying = settings.get("verify_recipients") is True
    if verify_recipients and not was_verifying:
        _set_key(item, "verify_recipients", True)
        changes.append(f"{name} now verifies recipients at its next hop")
    elif verify_recipients is False:
        if _remove_key(item, "verify_recipients") and was_verifying:
            changes.append(f"{name} no longer verifies recipients")

    return changes or [f"{name} already has those settings"]


def _change_delivery(
    item: Any,
    mailbox: _Mailbox,
    *,
    mode: str,
    next_hop: str | None,
    next_hop_tls: str | None,
) -> list[str]:
    """Set a mailbox's mode, next hop and TLS policy; a local one loses all."""
    name, settings = mailbox.address, mailbox.settings
    changes = []
    if mode != settings.get("mode", "local"):
        _set_key(item, "mode", mode)
        changes.append(f"changed the mode of {name} to {mode}")
    if mode == "local":
        if _remove_key(item, "next_hop"):
            changes.append(f"removed the next hop of {name}")
        if _remove_key(item, "next_hop_tls"):
            changes.append(f"removed the next hop TLS policy of {name}")
        if _remove_key(item, "verify_recipients"):
            changes.append(f"{name} no longer verifies recipients")
        return changes

    if next_hop is not None and next_hop != settings.get("next_hop"):
        _set_key(item, "next_hop", next_hop)
        changes.append(f"changed the next hop of {name} to {next_hop}")
    if next_hop_tls is not None:
        if next_hop_tls != settings.get("next_hop_tls", _DEFAULT_TLS):
            changes.append(
                f"changed the next hop TLS policy of {name} to {next_hop_tls}"
            )
        # The default is left out of the file, as `add_mailbox` does.
        if next_hop_tls == _DEFAULT_TLS:
            _remove_key(item, "next_hop_tls")
        else:
            _set_key(item, "next_hop_tls", next_hop_tls)
    return changes


def _change_catch_all(
    document: TOMLDocument, entries: _Entries, mailbox: _Mailbox, catch_all: bool
) -> list[str]:
    """Make ``mailbox`` its domain's catch-all, or stop it being that."""
    name = mailbox.address
    domain = name.domain
    current = entries.catch_alls.get(domain)
    if not catch_all:
        if current != name.key:
            return []
        _remove_key(_domain_table(document, entries, domain), "catch_all")
        return [f"{name} is no longer the catch-all of {domain}"]
    if current == name.key:
        return []

    _set_key(_domain_table(document, entries, domain), "catch_all", str(name))
    previous = entries.mailboxes.get(current) if current else None
    if previous is None:
        return [f"{name} is now the catch-all of {domain}"]
    changes = [f"{name} is now the catch-all of {domain}, replacing {previous.address}"]
    if previous.settings.get("verify_recipients") is True:
        _container, old_item = _find_entry(document, "mailboxes", previous.text)
        _remove_key(old_item, "verify_recipients")
        changes.append(f"{previous.address} no longer verifies recipients")
    return changes


def remove_mailbox(document: TOMLDocument, address: str) -> list[str]:
    """Delete mailbox ``address`` and take it out of every alias.

    An alias left with no target is dropped, unless it is a postmaster or
    abuse address, which refuses the whole change.  The domain's catch-all
    cannot be removed.
    """
    entries = _Entries.read(document)
    mailbox = entries.mailbox(_address(address))
    domain = mailbox.address.domain
    if entries.catch_alls.get(domain) == mailbox.address.key:
        raise EditError(
            f"{mailbox.address} is the catch_all of {domain}; "
            f'change domains."{domain}".catch_all first'
        )
    plan = entries.plan_removal(
        {mailbox.address.key}, cause=f"removing {mailbox.address}"
    )

    _remove_entry(document, "mailboxes", mailbox.text)
    plan.apply(document)
    return [
        f"removed mailbox {mailbox.address}",
        *plan.changes(),
        f"mail stored on disk for {mailbox.address} was left in place",
    ]


def set_password(
    document: TOMLDocument, address: str, *, new_password_hash: PasswordSource
) -> list[str]:
    """Give mailbox ``address`` the hash ``new_password_hash`` returns."""
    entries = _Entries.read(document)
    mailbox = entries.mailbox(_address(address))

    _container, item = _find_entry(document, "mailboxes", mailbox.text)
    _set_key(item, "password", new_password_hash())
    return [f"changed the password of {mailbox.address}"]


def add_alias(document: TOMLDocument, alias: str, target: str) -> list[str]:
    """Add ``target`` to the targets of ``alias``, creating the alias if new."""
    entries = _Entries.read(document)
    alias_address = _address(alias)
    if alias_address.domain not in entries.domains:
        raise EditError(f"no such domain {alias_address.domain}")
    if alias_address.key in entries.mailboxes:
        raise EditError(f"{alias_address} is a mailbox")
    target_address = _address(target)
    if target_address.key == alias_address.key:
        raise EditError(f"{alias_address} cannot go to itself")
    entries.require_known_target(target_address)

    existing = entries.aliases.get(alias_address.key)
    if existing is None:
        array = tomlkit.item([str(target_address)])
        _add_entry(document, "aliases", str(alias_address), array)
        return [f"added alias {alias_address} -> {target_address}"]
    if target_address.key in existing.targets:
        raise EditError(f"{existing.address} already goes to {target_address}")
    _container, array = _find_entry(document, "aliases", existing.text)
    array.append(str(target_address))
    return [f"{existing.address} now also goes to {target_address}"]


def remove_alias(document: TOMLDocument, alias: str, target: str) -> list[str]:
    """Take ``target`` out of ``alias``; an alias left empty is dropped.

    A postmaster or abuse alias is never left empty: that change is refused.
    """
    entries = _Entries.read(document)
    alias_address = _address(alias)
    existing = entries.aliases.get(alias_address.key)
    if existing is None:
        raise EditError(f"no such alias {alias_address}")
    target_address = _address(target)
    if target_address.key not in existing.targets:
        raise EditError(f"{existing.address} does not go to {target_address}")

    if set(existing.targets) != {target_address.key}:
        _remove_targets(document, existing, {target_address.key})
        return [f"{existing.address} no longer goes to {target_address}"]
    if existing.required:
        raise EditError(f"that would leave {existing.address} without a target")
    plan = entries.plan_removal(
        {existing.address.key}, cause=f"removing alias {existing.address}"
    )
    _remove_entry(document, "aliases", existing.text)
    plan.apply(document)
    return [f"removed alias {existing.address}", *plan.changes()]


# -- What the document holds --------------------------------------------------


def _domain(name: str) -> str:
    try:
        return normalise_domain(name)
    except AddressError as exc:
        raise EditError(f"invalid domain {name!r}: {exc.reason}") from None


def _address(text: str) -> Address:
    try:
        address = parse_address(text)
    except AddressError as exc:
        raise EditError(f"invalid address {text!r}: {exc.reason}") from None
    if address.domain is None or address.literal:
        raise EditError(f"{text!r} needs a domain name")
    return address


def _parsed_or_none(text: Any) -> Address | None:
    if not isinstance(text, str):
        return None
    try:
        return _address(text)
    except EditError:
        return None


@dataclass
class _Mailbox:
    text: str
    address: Address
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Alias:
    text: str
    address: Address
    # Keys of the targets; one that does not parse is kept as written.
    targets: list[str]

    @property
    def required(self) -> bool:
        return self.address.local_key in REQUIRED_ALIASES


@dataclass
class _Entries:
    """The domains, mailboxes and aliases of a document, keyed for comparison.

    Entries the loader would refuse are skipped: whatever the edit, the
    loader still has the last word on the new text.
    """

    domains: dict[str, str] = field(default_factory=dict)
    catch_alls: dict[str, str] = field(default_factory=dict)
    mailboxes: dict[str, _Mailbox] = field(default_factory=dict)
    aliases: dict[str, _Alias] = field(default_factory=dict)

    @classmethod
    def read(cls, document: TOMLDocument) -> _Entries:
        plain = document.unwrap()
        entries = cls()
        for text, raw in _mapping(plain.get("domains")).items():
            try:
                domain = normalise_domain(text)
            except AddressError:
                continue
            entries.domains.setdefault(domain, text)
            catch_all = _parsed_or_none(_mapping(raw).get("catch_all"))
            if catch_all is not None:
                entries.catch_alls[domain] = catch_all.key
        for text, raw in _mapping(plain.get("mailboxes")).items():
            address = _parsed_or_none(text)
            if address is not None:
                entries.mailboxes.setdefault(
                    address.key, _Mailbox(text, address, _mapping(raw))
                )
        for text, targets in _mapping(plain.get("aliases")).items():
            address = _parsed_or_none(text)
            if address is None or not isinstance(targets, list):
                continue
            keys = [_target_key(target) for target in targets]
            entries.aliases.setdefault(address.key, _Alias(text, address, keys))
        return entries

    def mailbox(self, address: Address) -> _Mailbox:
        """The mailbox ``address`` names, or EditError."""
        try:
            return self.mailboxes[address.key]
        except KeyError:
            raise EditError(f"no such mailbox {address}") from None

    def require_known_target(self, target: Address) -> None:
        """Refuse ``target`` as an alias target unless it is ours and exists."""
        if target.domain not in self.domains:
            raise EditError(f"{target} is not in a configured domain")
        if target.key not in self.mailboxes and target.key not in self.aliases:
            raise EditError(f"{target} is not a mailbox or alias")

    def plan_removal(self, gone: set[str], *, cause: str) -> _RemovalPlan:
        """What removing the addresses ``gone`` does to the other aliases.

        An alias whose every target goes is removed in turn, which may empty
        another; emptying a postmaster or abuse alias refuses the change, and
        the message names ``cause``.
        """
        gone = set(gone)
        plan = _RemovalPlan()
        while True:
            emptied = [
                alias
                for alias in self.aliases.values()
                if alias.address.key not in gone
                and alias.targets
                and set(alias.targets) <= gone
            ]
            if not emptied:
                break
            for alias in emptied:
                if alias.required:
                    raise EditError(
                        f"{cause} would leave {alias.address} without a target"
                    )
                gone.add(alias.address.key)
                plan.dropped.append(alias)

        for alias in self.aliases.values():
            lost = set(alias.targets) & gone
            if lost and alias.address.key not in gone:
                plan.trimmed.append((alias, lost))
        return plan


@dataclass
class _RemovalPlan:
    """Aliases to drop, and targets to take out of the others."""

    dropped: list[_Alias] = field(default_factory=list)
    trimmed: list[tuple[_Alias, set[str]]] = field(default_factory=list)

    def apply(self, document: TOMLDocument) -> None:
        """Make the planned changes to ``document``."""
        for alias in self.dropped:
            _remove_entry(document, "aliases", alias.text)
        for alias, lost in self.trimmed:
            _remove_targets(document, alias, lost)

    def changes(self) -> list[str]:
        """One line per planned change, for the administrator."""
        lines = [f"removed alias {alias.address}" for alias in self.dropped]
        for alias, lost in self.trimmed:
            lines.append(f"{alias.address} no longer goes to {', '.join(sorted(lost))}")
        return lines


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _target_key(text: Any) -> str:
    address = _parsed_or_none(text)
    return address.key if address is not None else str(text)


def _count(items: list[Any], one: str, many: str) -> str:
    return f"1 {one}" if len(items) == 1 else f"{len(items)} {many}"


def _check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MAILBOX_MODES:
        raise EditError(f"mode {mode!r} is not one of: {', '.join(MAILBOX_MODES)}")


def _check_next_hop(next_hop: str | None) -> None:
    if next_hop is not None and not next_hop.strip():
        raise EditError("the next hop may not be empty")


def _check_tls(policy: str | None) -> None:
    if policy is not None and policy not in NEXT_HOP_TLS:
        raise EditError(
            f"next hop TLS {policy!r} is not one of: {', '.join(NEXT_HOP_TLS)}"
        )


def _mailbox_table(
    mode: str,
    password_hash: str | None,
    next_hop: str | None = None,
    next_hop_tls: str | None = None,
) -> Table:
    table = tomlkit.table()
    table.add("mode", mode)
    if next_hop is not None:
        table.add("next_hop", next_hop)
    if next_hop_tls not in (None, _DEFAULT_TLS):
        table.add("next_hop_tls", next_hop_tls)
    if password_hash is not None:
        table.add("password", password_hash)
    return table


def _domain_table(document: TOMLDocument, entries: _Entries, domain: str) -> Any:
    if domain not in entries.domains:
        raise EditError(f"no such domain {domain}")
    _container, item = _find_entry(document, "domains", entries.domains[domain])
    return item


# -- Changing the document without disturbing its comments ---------------------
#
# tomlkit keeps the comments and blank lines that precede a table header at
# the end of the previous table.  Adding or removing a table therefore moves
# those lines along, so that each comment stays above the header it was above.


def _fragments(document: TOMLDocument, section: str) -> list[Table]:
    """The tables that make up ``section``, in file order (one, usually)."""
    return [
        item
        for key, item in document.body
        if key is not None and key.key == section and isinstance(item, Table)
    ]


def _find_entry(
    document: TOMLDocument, section: str, key: str
) -> tuple[Container, Any]:
    for fragment in _fragments(document, section):
        if key in fragment.value:
            return fragment.value, fragment.value.item(key)
    raise KeyError(f"{section}.{key}")


def _add_entry(document: TOMLDocument, section: str, key: str, item: Item) -> None:
    fragments = _fragments(document, section)
    if not fragments:
        document.add(section, tomlkit.table(is_super_table=isinstance(item, Table)))
        fragments = _fragments(document, section)
    container = fragments[-1].value

    if not isinstance(item, Table):
        _add_key(container, key, item)
        return
    container.append(key, item)
    item.trivia.indent = ""
    tables = list(_tables_in_order(document))
    index = next(i for i, table in enumerate(tables) if table is item)
    previous = tables[index - 1] if index > 0 else None
    has_next = index + 1 < len(tables)

    # The comments right above the next header now come after the new table.
    moved: list[Item] = []
    if previous is not None and previous.value is not container:
        body = previous.value.body
        while body and body[-1][0] is None and isinstance(body[-1][1], Comment):
            moved.insert(0, body.pop()[1])
        if not _ends_blank(previous.value):
            previous.value.add(tomlkit.nl())
    if has_next or moved:
        item.value.add(tomlkit.nl())
    for comment in moved:
        item.value.add(comment)


def _remove_entry(document: TOMLDocument, section: str, key: str) -> None:
    container, item = _find_entry(document, section, key)
    if not isinstance(item, Table):
        container.remove(key)
        return

    tables = list(_tables_in_order(document))
    index = next(i for i, table in enumerate(tables) if table is item)
    trailing = _pop_trailing(item.value)
    container.remove(key)

    # What followed the last key of the removed table belongs to the header
    # after it: hand it to the table now above that header.  A blank line
    # is only kept where it still separates a key from that header.
    previous = tables[index - 1] if index > 0 else None
    if previous is not None and not _has_tables(previous.value):
        last = _last_entry(previous.value)
        if last is None or last[0] is None:
            while trailing and isinstance(trailing[0], Whitespace):
                trailing.pop(0)
        for extra in trailing:
            previous.value.add(extra)
    elif index + 1 < len(tables):
        following = tables[index + 1]
        text = "".join(extra.as_string() for extra in trailing)
        following.trivia.indent = text + following.trivia.indent
    else:
        for extra in trailing:
            document.add(extra)


def _tables_in_order(container: Container) -> Iterator[Table]:
    """Every table that renders a header, in file order."""
    for key, item in container.body:
        if key is None or not isinstance(item, Table):
            continue
        if not item.is_super_table():
            yield item
        yield from _tables_in_order(item.value)


def _pop_trailing(container: Container) -> list[Item]:
    """Take the comments and blank lines after the last key of ``container``."""
    trailing: list[Item] = []
    body = container.body
    while body and body[-1][0] is None:
        extra = body.pop()[1]
        if not isinstance(extra, Null):
            trailing.insert(0, extra)
    return trailing


def _last_entry(container: Container) -> tuple[Any, Item] | None:
    for key, item in reversed(container.body):
        if not isinstance(item, Null):
            return key, item
    return None


def _ends_blank(container: Container) -> bool:
    last = _last_entry(container)
    return last is not None and last[0] is None and isinstance(last[1], Whitespace)


def _has_tables(container: Container) -> bool:
    return any(isinstance(item, Table) for _, item in container.body)


def _add_key(container: Container, key: str, value: Any) -> None:
    """Add ``key`` after the last key, above any trailing comments."""
    trailing = _pop_trailing(container)
    container.append(key, value)
    for extra in trailing:
        container.add(extra)


def _set_key(item: Any, key: str, value: Any) -> None:
    if key in item or not isinstance(item, Table):
        item[key] = value
    else:
        _add_key(item.value, key, value)


def _remove_key(item: Any, key: str) -> bool:
    """Remove ``key`` from a table, if there; whether it was."""
    if key not in item:
        return False
    del item[key]
    return True


def _remove_targets(document: TOMLDocument, alias: _Alias, lost: set[str]) -> None:
    _container, array = _find_entry(document, "aliases", alias.text)
    for index in reversed(range(len(array))):
        if _target_key(array[index]) in lost:
            del array[index]
