"""Reading ``powermail.toml`` into typed, immutable settings.

Every problem is reported as a ConfigError that names the file, the key and
what is wrong; nothing half-valid is ever returned.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from powermail.address import Address, AddressError, normalise_domain, parse_address
from powermail.config._schema import (
    DOMAIN_KEYS,
    MAILBOX_KEYS,
    MAILBOX_MODES,
    NEXT_HOP_TLS,
    SECTIONS,
    Key,
)
from powermail.directory import Directory, Domain, Mailbox, ResolveError
from powermail.passwords import is_password_hash

__all__ = [
    "Config",
    "ConfigError",
    "DnsSettings",
    "QueueSettings",
    "Listen",
    "ImapSettings",
    "MxSettings",
    "ServerSettings",
    "TlsSettings",
    "load_config",
    "parse_config",
]

# Every hosted domain must resolve these, as RFC 5321 and RFC 2142 expect.
REQUIRED_ALIASES = ("postmaster", "abuse")


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is the whole message."""

    def __init__(self, path: Path | str, key: str, reason: str) -> None:
        super().__init__(f"{path}: {key}: {reason}")
        self.path = str(path)
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class Listen:
    """One address a listener binds: ``host`` is an IP address."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return (
            f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"
        )


@dataclass(frozen=True)
class ServerSettings:
    hostname: str
    data_dir: Path
    recipient_delimiter: str
    reload_interval: int


@dataclass(frozen=True)
class TlsSettings:
    """``None`` for both files means: make a self-signed pair under data_dir."""

    certificate: Path | None
    private_key: Path | None
    ca_file: Path | None


@dataclass(frozen=True)
class MxSettings:
    listen: tuple[Listen, ...]
    max_message_size: int
    max_recipients: int
    max_command_line: int
    max_body_line: int
    max_errors: int
    max_connections: int
    max_connections_per_client: int
    idle_timeout: int
    session_timeout: int


@dataclass(frozen=True)
class ImapSettings:
    listen: tuple[Listen, ...]
    tls_listen: tuple[Listen, ...]
    loopback_plaintext: bool
    max_literal_size: int
    max_command_line: int
    max_errors: int
    max_login_failures: int
    login_failure_delay: int
    max_connections: int
    max_connections_per_client: int
    idle_timeout: int
    login_timeout: int


@dataclass(frozen=True)
class DnsSettings:
    servers: tuple[Listen, ...]


@dataclass(frozen=True)
class QueueSettings:
    retry_delays: tuple[int, ...]
    max_age: int
    delay_warning: int
    smtp_port: int
    max_per_destination: int
    connect_timeout: int
    command_timeout: int


@dataclass(frozen=True)
class Config:
    """The whole validated configuration of one PowerMail node."""

    path: Path
    server: ServerSettings
    tls: TlsSettings
    mx: MxSettings
    imap: ImapSettings
    dns: DnsSettings
    queue: QueueSettings
    directory: Directory

    def listener_settings(self) -> tuple[Any, ...]:
        """What only a restart can change: data_dir, TLS files, listeners, DNS."""
        return (
            self.server.data_dir,
            self.tls,
            self.mx.listen,
            self.imap.listen,
            self.imap.tls_listen,
            self.dns.servers,
        )


class _Reader:
    """Checks one parsed TOML document against the schema."""

    def __init__(self, path: Path, document: Mapping[str, Any]) -> None:
        self.path = path
        self.base = path.parent
        self.document = document

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def table(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a table, not {_type_name(value)}")
        return value

    def section(self, name: str, schema: Mapping[str, Key], raw: Any, where: str):
        table = self.table(raw, where) if raw is not None else {}
        for key in table:
            if key not in schema:
                known = ", ".join(sorted(schema))
                raise self.error(f"{where}.{key}", f"unknown key (known: {known})")
        return {
            key: self.value(f"{where}.{key}", spec, table.get(key, None))
            for key, spec in schema.items()
        }

    def value(self, where: str, spec: Key, value: Any) -> Any:
        if value is None:
            value = spec.default_value()
        kind = spec.kind
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(where, f"must be an integer, not {_type_name(value)}")
            if spec.minimum is not None and value < spec.minimum:
                raise self.error(where, f"must be at least {spec.minimum}")
            if spec.maximum is not None and value > spec.maximum:
                raise self.error(where, f"must be at most {spec.maximum}")
            return value
        if kind in ("str", "path"):
            if not isinstance(value, str):
                raise self.error(where, f"must be a string, not {_type_name(value)}")
            if kind == "path":
                return (self.base / value).resolve() if value else None
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.error(
                    where, f"must be true or false, not {_type_name(value)}"
                )
            return value
        if kind == "ints":
            if not isinstance(value, list) or not value:
                raise self.error(where, "must be a non-empty list of integers")
            item = Key("int", None, "", spec.minimum, spec.maximum)
            return tuple(
                self.value(f"{where}[{i}]", item, v) for i, v in enumerate(value)
            )
        if kind == "servers":
            if not isinstance(value, list):
                raise self.error(where, "must be a list of 'ip' or 'ip:port'")
            return tuple(
                self.server_address(f"{where}[{i}]", v) for i, v in enumerate(value)
            )
        if kind == "listen":
            if not isinstance(value, list) or not value:
                raise self.error(where, "must be a non-empty list of 'host:port'")
            return tuple(self.listen(f"{where}[{i}]", v) for i, v in enumerate(value))
        raise AssertionError(f"unknown kind {kind}")

    def listen(self, where: str, value: Any) -> Listen:
        if not isinstance(value, str):
            raise self.error(
                where, f"must be a string 'host:port', not {_type_name(value)}"
            )
        host, sep, port_text = value.rpartition(":")
        if not sep or not port_text.isdigit():
            raise self.error(where, f"{value!r} is not 'host:port'")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise self.error(where, f"{host!r} is not an IP address") from None
        port = int(port_text)
        if not 0 < port < 65536:
            raise self.error(where, f"port {port} is out of range 1-65535")
        return Listen(host, port)

    def server_address(self, where: str, value: Any) -> Listen:
        """A DNS server: an IP address, with ':port' when not 53."""
        if isinstance(value, str):
            try:
                return Listen(str(ipaddress.ip_address(value.strip("[]"))), 53)
            except ValueError:
                pass
        return self.listen(where, value)


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
    }.get(
        type(value), "a table" if isinstance(value, Mapping) else type(value).__name__
    )


def read_config_text(path: Path) -> str:
    """The text of the configuration file, or a ConfigError saying why not."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "(file)", f"not UTF-8: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(path, "(file)", exc.strerror or str(exc)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate the configuration file at ``path``."""
    path = Path(path).absolute()
    return parse_config(read_config_text(path), path)


def parse_config(text: str, path: str | Path) -> Config:
    """Validate configuration ``text`` as if read from ``path``."""
    path = Path(path).absolute()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", str(exc)) from None
    reader = _Reader(path, document)

    known = set(SECTIONS) | {"domains", "mailboxes", "aliases"}
    for key in document:
        if key not in known:
            raise reader.error(
                key, f"unknown section (known: {', '.join(sorted(known))})"
            )

    server = reader.section(
        "server", SECTIONS["server"], document.get("server"), "server"
    )
    tls = reader.section("tls", SECTIONS["tls"], document.get("tls"), "tls")
    mx = reader.section("mx", SECTIONS["mx"], document.get("mx"), "mx")
    imap = ImapSettings(
        **reader.section("imap", SECTIONS["imap"], document.get("imap"), "imap")
    )
    dns = DnsSettings(
        **reader.section("dns", SECTIONS["dns"], document.get("dns"), "dns")
    )
    queue = QueueSettings(
        **reader.section("queue", SECTIONS["queue"], document.get("queue"), "queue")
    )

    server = ServerSettings(**server)
    if server.data_dir is None:
        raise reader.error("server.data_dir", "must not be empty")
    if server.recipient_delimiter and len(server.recipient_delimiter) != 1:
        raise reader.error(
            "server.recipient_delimiter", "must be one character or empty"
        )
    try:
        normalise_domain(server.hostname)
    except AddressError as exc:
        raise reader.error(
            "server.hostname", f"{server.hostname!r}: {exc.reason}"
        ) from None

    tls = TlsSettings(**tls)
    _check_tls(reader, tls)
    mx = MxSettings(**mx)
    _check_ports(
        reader,
        {
            "mx.listen": mx.listen,
            "imap.listen": imap.listen,
            "imap.tls_listen": imap.tls_listen,
        },
    )

    directory = _read_directory(reader, document, server.recipient_delimiter)
    return Config(
        path=path,
        server=server,
        tls=tls,
        mx=mx,
        imap=imap,
        dns=dns,
        queue=queue,
        directory=directory,
    )


def _check_tls(reader: _Reader, tls: TlsSettings) -> None:
    if (tls.certificate is None) != (tls.private_key is None):
        missing = "tls.private_key" if tls.private_key is None else "tls.certificate"
        raise reader.error(
            missing, "give both tls.certificate and tls.private_key, or neither"
        )
    for key, path in (
        ("tls.certificate", tls.certificate),
        ("tls.private_key", tls.private_key),
        ("tls.ca_file", tls.ca_file),
    ):
        if path is not None and not path.is_file():
            raise reader.error(key, f"{path}: no such file")


def _check_ports(reader: _Reader, listeners: Mapping[str, tuple[Listen, ...]]) -> None:
    """Refuse two listeners that would bind the same address and port.

    A wildcard (0.0.0.0 or ::) takes the port on every address, so it
    conflicts with any other listener on that port.
    """
    seen: list[tuple[Listen, str]] = []
    for key, addresses in listeners.items():
        for index, listen in enumerate(addresses):
            where = f"{key}[{index}]"
            for other, other_where in seen:
                wildcard = {listen.host, other.host} & {"0.0.0.0", "::"}
                if other.port == listen.port and (
                    other.host == listen.host or wildcard
                ):
                    raise reader.error(
                        where, f"port {listen.port} is already used by {other_where}"
                    )
            seen.append((listen, where))


def _address(reader: _Reader, where: str, text: Any) -> Address:
    if not isinstance(text, str):
        raise reader.error(where, f"must be an address string, not {_type_name(text)}")
    try:
        address = parse_address(text)
    except AddressError as exc:
        raise reader.error(where, f"invalid address {text!r}: {exc.reason}") from None
    if address.domain is None or address.literal:
        raise reader.error(where, f"{text!r} needs a domain name")
    return address


def _read_directory(
    reader: _Reader, document: Mapping[str, Any], delimiter: str
) -> Directory:
    domains: dict[str, Domain] = {}
    catch_alls: dict[str, tuple[str, Address]] = {}
    for name, raw in reader.table(document.get("domains", {}), "domains").items():
        where = f'domains."{name}"'
        try:
            domain = normalise_domain(name)
        except AddressError as exc:
            raise reader.error(where, f"invalid domain name: {exc.reason}") from None
        if domain in domains:
            raise reader.error(where, f"duplicate domain (same as {domain})")
        settings = reader.section(where, DOMAIN_KEYS, raw, where)
        if settings["catch_all"]:
            catch_all = _address(reader, f"{where}.catch_all", settings["catch_all"])
            if catch_all.domain != domain:
                raise reader.error(
                    f"{where}.catch_all", "must be a mailbox of this domain"
                )
            catch_alls[domain] = (f"{where}.catch_all", catch_all)
        domains[domain] = Domain(domain)
    if not domains:
        raise reader.error("domains", "at least one domain must be configured")

    mailboxes: dict[str, Mailbox] = {}
    for text, raw in reader.table(document.get("mailboxes", {}), "mailboxes").items():
        where = f'mailboxes."{text}"'
        address = _mailbox_address(reader, where, text, domains)
        if address.key in mailboxes:
            raise reader.error(
                where, f"duplicate mailbox (same as {mailboxes[address.key].address})"
            )
        settings = reader.section(where, MAILBOX_KEYS, raw, where)
        if settings["mode"] not in MAILBOX_MODES:
            allowed = ", ".join(MAILBOX_MODES)
            raise reader.error(
                f"{where}.mode", f"{settings['mode']!r} is not one of: {allowed}"
            )
        password = settings["password"] or None
        if password is not None and not is_password_hash(password):
            raise reader.error(
                f"{where}.password",
                "must be an argon2 hash (set it with `powermail mailbox passwd`)",
            )
        mailboxes[address.key] = _mailbox(reader, where, address, settings, password)

    aliases: dict[str, tuple[str, ...]] = {}
    for text, targets in reader.table(document.get("aliases", {}), "aliases").items():
        where = f'aliases."{text}"'
        address = _address(reader, where, text)
        if address.domain not in domains:
            raise reader.error(where, f"domain {address.domain} is not configured")
        if address.key in mailboxes:
            raise reader.error(where, "is already a mailbox")
        if address.key in aliases:
            raise reader.error(where, "duplicate alias")
        if not isinstance(targets, list) or not targets:
            raise reader.error(where, "must be a non-empty list of addresses")
        keys = []
        for index, target in enumerate(targets):
            target_address = _address(reader, f"{where}[{index}]", target)
            if target_address.domain not in domains:
                raise reader.error(
                    f"{where}[{index}]", f"{target} is not in a configured domain"
                )
            keys.append(target_address.key)
        aliases[address.key] = tuple(keys)

    for domain, (where, catch_all) in catch_alls.items():
        if catch_all.key not in mailboxes:
            raise reader.error(where, f"{catch_all} is not a configured mailbox")
        domains[domain] = Domain(domain, catch_all.key)
    catch_all_keys = {d.catch_all for d in domains.values()}
    for mailbox in mailboxes.values():
        if mailbox.verify_recipients and (
            mailbox.mode != "redirect" or mailbox.key not in catch_all_keys
        ):
            raise reader.error(
                f'mailboxes."{mailbox.address}".verify_recipients',
                "applies only to a domain's catch-all in redirect mode",
            )

    directory = Directory(
        domains=MappingProxyType(domains),
        mailboxes=MappingProxyType(mailboxes),
        aliases=MappingProxyType(aliases),
        recipient_delimiter=delimiter,
        default_domain=next(iter(domains)),
    )
    for key in aliases:
        try:
            directory.expand(key)
        except ResolveError as exc:
            raise reader.error(f'aliases."{key}"', str(exc)) from None
    for domain in domains:
        if domains[domain].catch_all is not None:
            continue  # the catch-all receives postmaster@ and abuse@ too
        for local in REQUIRED_ALIASES:
            key = f"{local}@{domain}"
            if directory.expand(key) is None:
                raise reader.error(
                    f'domains."{domain}"',
                    f'{key} must be a mailbox or an alias to one (add aliases."{key}")',
                )
    return directory


def _mailbox(
    reader: _Reader,
    where: str,
    address: Address,
    settings: Mapping[str, Any],
    password: str | None,
) -> Mailbox:
    """A mailbox with its mode's settings checked."""
    from powermail.queue.nexthop import parse_next_hop

    mode = settings["mode"]
    next_hop = settings["next_hop"] or None
    if settings["next_hop_tls"] not in NEXT_HOP_TLS:
        raise reader.error(
            f"{where}.next_hop_tls",
            f"{settings['next_hop_tls']!r} is not one of: {', '.join(NEXT_HOP_TLS)}",
        )
    if mode == "redirect":
        if next_hop is None:
            raise reader.error(
                f"{where}.next_hop", "a redirect mailbox needs a next hop"
            )
        try:
            parse_next_hop(next_hop)
        except ValueError as exc:
            raise reader.error(f"{where}.next_hop", f"{next_hop!r}: {exc}") from None
    elif next_hop is not None:
        raise reader.error(
            f"{where}.next_hop", "only a redirect mailbox has a next hop"
        )
    return Mailbox(
        address,
        mode,
        password,
        next_hop=next_hop,
        next_hop_tls=settings["next_hop_tls"],
        verify_recipients=settings["verify_recipients"],
    )


def _mailbox_address(reader: _Reader, where: str, text: str, domains) -> Address:
    address = _address(reader, where, text)
    if address.domain not in domains:
        raise reader.error(where, f"domain {address.domain} is not configured")
    # The local part names a folder on disk, so nothing may climb out of it.
    local = address.local
    if "/" in local or "\\" in local or local.startswith(".") or "\x00" in local:
        raise reader.error(where, "local part may not contain '/' or start with '.'")
    return address
