"""``twistd powermail``: options, and the service tree built from the config.

Nothing is built at import time; ``makeService`` assembles one MultiService
with a child per listener and per timer.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, ssl
from twisted.logger import Logger
from twisted.python import usage

from powermail import __version__
from powermail.config import Config, ConfigError, Listen, load_config
from powermail.config.watcher import ConfigWatcher, RunningConfig
from powermail.control import ControlFactory
from powermail.imap.auth import make_portal
from powermail.imap.notify import FolderNotifier
from powermail.imap.protocol import ImapFactory, ImapLimits
from powermail.queue.callout import RecipientVerifier
from powermail.queue.client import deliver
from powermail.queue.nexthop import NextHopResolver, make_resolver
from powermail.queue.runner import QueueRunner
from powermail.queue.store import QueueStore
from powermail.smtp.mx import MxPolicy
from powermail.smtp.protocol import SmtpFactory, SmtpLimits
from powermail.storage.maildir import MaildirStore
from powermail.tls import ensure_self_signed, server_tls_options

__all__ = ["Options", "makeService"]

_log = Logger()


class Options(usage.Options):
    """Options of ``twistd powermail``."""

    synopsis = "[--config FILE]"
    longdesc = (
        "Runs PowerMail: the MX listener delivering into local Maildirs. "
        "Everything else is set in the TOML configuration file."
    )
    optParameters = [  # noqa: N815 (Twisted's name)
        ["config", "c", "conf/powermail.toml", "configuration file (TOML)"],
    ]

    def postOptions(self) -> None:  # noqa: N802 (Twisted's name)
        # A broken configuration must stop the start with one clear line,
        # not twistd's usage text: report and exit here.
        try:
            config = load_config(self["config"])
            self["tls_options"] = _tls_options(config)
            self["trust_root"] = _trust_root(config)
            config.server.data_dir.mkdir(parents=True, exist_ok=True)
            self["lock"] = _lock_data_dir(config)
            _check_addresses_free(config)
        except ConfigError as exc:
            sys.stderr.write(f"powermail: {exc}\n")
            raise SystemExit(1) from None
        except OSError as exc:
            sys.stderr.write(
                f"powermail: {config.path}: server.data_dir: {exc.strerror}: "
                f"{exc.filename}\n"
            )
            raise SystemExit(1) from None
        self["loaded"] = config


def _lock_data_dir(config: Config):
    """Hold ``data_dir/powermail.lock`` for as long as this process runs.

    A second server on the same data would share its queue and Maildirs
    and take over its control socket.
    """
    path = config.server.data_dir / "powermail.lock"
    lock = open(path, "a+b")  # noqa: SIM115 (held until the process exits)
    os.chmod(path, 0o600)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(
            config.path,
            "server.data_dir",
            f"another PowerMail is running with {config.server.data_dir}",
        ) from None
    return lock


def _check_addresses_free(config: Config) -> None:
    """Refuse to start, in one line, when a listener's address is taken.

    The listeners would fail later anyway, with a traceback; this names the
    key.  (Another program could still take the port in between.)
    """
    keys = {
        "mx.listen": config.mx.listen,
        "imap.listen": config.imap.listen,
        "imap.tls_listen": config.imap.tls_listen,
    }
    for key, addresses in keys.items():
        for index, listen in enumerate(addresses):
            family = socket.AF_INET6 if listen.is_ipv6 else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # As Twisted binds: a port in TIME_WAIT is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((listen.host, listen.port))
                except OSError as exc:
                    raise ConfigError(
                        config.path, f"{key}[{index}]", f"{listen}: {exc.strerror}"
                    ) from None


def _tls_options(config: Config):
    tls = config.tls
    if tls.certificate is None:
        try:
            cert, key = ensure_self_signed(
                config.server.data_dir / "tls", config.server.hostname
            )
        except OSError as exc:
            raise ConfigError(
                config.path, "server.data_dir", f"cannot write TLS files: {exc}"
            ) from None
    else:
        cert, key = tls.certificate, tls.private_key
    try:
        return server_tls_options(Path(cert), Path(key))
    except ValueError as exc:
        raise ConfigError(config.path, "tls.certificate", str(exc)) from None


def _trust_root(config: Config):
    """The CAs that verify next hops with TLS required; None: the system's."""
    if config.tls.ca_file is None:
        return None
    try:
        certificates = x509.load_pem_x509_certificates(config.tls.ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(config.path, "tls.ca_file", f"cannot load: {exc}") from None
    return ssl.trustRootFromCertificates(
        [
            ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in certificates
        ]
    )


def _limits(config: Config) -> SmtpLimits:
    mx = config.mx
    return SmtpLimits(
        max_message_size=mx.max_message_size,
        max_recipients=mx.max_recipients,
        max_command_line=mx.max_command_line,
        max_body_line=mx.max_body_line,
        max_errors=mx.max_errors,
        max_connections=mx.max_connections,
        max_connections_per_client=mx.max_connections_per_client,
        idle_timeout=mx.idle_timeout,
        session_timeout=mx.session_timeout,
    )


def _imap_limits(config: Config) -> ImapLimits:
    imap = config.imap
    return ImapLimits(
        loopback_plaintext=imap.loopback_plaintext,
        max_literal_size=imap.max_literal_size,
        max_command_line=imap.max_command_line,
        max_errors=imap.max_errors,
        max_login_failures=imap.max_login_failures,
        login_failure_delay=imap.login_failure_delay,
        max_connections=imap.max_connections,
        max_connections_per_client=imap.max_connections_per_client,
        idle_timeout=imap.idle_timeout,
        login_timeout=imap.login_timeout,
    )


def _endpoint(reactor, listen: Listen):
    kind = (
        endpoints.TCP6ServerEndpoint if listen.is_ipv6 else endpoints.TCP4ServerEndpoint
    )
    return kind(reactor, listen.port, backlog=128, interface=listen.host)


def _tls_endpoint(reactor, listen: Listen, tls_options):
    return endpoints.SSL4ServerEndpoint(
        reactor, listen.port, tls_options, backlog=128, interface=listen.host
    )


def _listener(endpoint, factory) -> StreamServerEndpointService:
    """A listening service whose failure to bind stops the start."""
    listener = StreamServerEndpointService(endpoint, factory)
    # Twisted's documented switch: raise from privilegedStartService, so
    # twistd reports the address in use and exits instead of running on
    # without the listener.
    listener._raiseSynchronously = True
    return listener


def _imap_services(reactor, config: Config, running, store, tls_options):
    """The IMAP (STARTTLS) and IMAPS listeners, sharing their limits."""

    def maildir_for(key: str):
        local, _, domain = key.rpartition("@")
        return store.maildir_for(domain, local)

    portal = make_portal(lambda: running.current.directory, maildir_for)
    notifier = FolderNotifier(reactor)
    factories = [
        ImapFactory(
            portal=portal,
            limits=_imap_limits(config),
            clock=reactor,
            tls_options=tls_options,
            notifier=notifier,
            tls=tls,
        )
        for tls in (False, True)
    ]
    # One count of sessions for both listeners.
    factories[1].shared_counts = factories[0].shared_counts

    def apply_limits(new: Config) -> None:
        for factory in factories:
            factory.limits = _imap_limits(new)

    running.subscribe(apply_limits)
    services = []
    for listen in config.imap.listen:
        imap = _listener(_endpoint(reactor, listen), factories[0])
        imap.setName(f"imap {listen}")
        services.append(imap)
    for listen in config.imap.tls_listen:
        imaps = _listener(_tls_endpoint(reactor, listen, tls_options), factories[1])
        imaps.setName(f"imaps {listen}")
        services.append(imaps)
    return services


def makeService(options: Options) -> service.MultiService:  # noqa: N802
    """Build every PowerMail service from the loaded configuration."""
    from twisted.internet import reactor

    config: Config = options["loaded"]
    running = RunningConfig(config)
    top = service.MultiService()

    store = MaildirStore(config.server.data_dir / "mail")
    queue = QueueStore(config.server.data_dir / "queue")
    resolver = NextHopResolver(
        make_resolver([(s.host, s.port) for s in config.dns.servers] or None)
    )
    runner = QueueRunner(
        store=queue,
        settings=lambda: running.current,
        resolver=resolver,
        clock=reactor,
        deliver=deliver,
        trust_root=options["trust_root"],
    )
    runner.setName("queue runner")
    runner.setServiceParent(top)
    policy = MxPolicy(
        directory=lambda: running.current.directory,
        store=store,
        queue=queue,
        queued=runner.add,
        verifier=RecipientVerifier(
            resolver=resolver,
            settings=lambda: running.current,
            reactor=reactor,
            trust_root=options["trust_root"],
        ),
    )
    factory = SmtpFactory(
        policy=policy,
        limits=_limits(config),
        hostname=lambda: running.current.server.hostname,
        clock=reactor,
        tls_options=options["tls_options"],
    )

    def apply_limits(new: Config) -> None:
        factory.limits = _limits(new)

    running.subscribe(apply_limits)
    for listen in config.mx.listen:
        mx = _listener(_endpoint(reactor, listen), factory)
        mx.setName(f"mx {listen}")
        mx.setServiceParent(top)

    for imap in _imap_services(reactor, config, running, store, options["tls_options"]):
        imap.setServiceParent(top)

    _log.info(
        "PowerMail {version} with {path}: {domains} domains, {mailboxes} mailboxes",
        version=__version__,
        path=str(config.path),
        domains=len(config.directory.domains),
        mailboxes=len(config.directory.mailboxes),
    )
    control_path = config.server.data_dir / "control.sock"
    control_path.unlink(missing_ok=True)
    control = StreamServerEndpointService(
        endpoints.UNIXServerEndpoint(reactor, str(control_path), mode=0o600),
        ControlFactory(runner),
    )
    control.setName("control socket")
    control.setServiceParent(top)

    watcher = ConfigWatcher(running, clock=reactor)
    watcher.setName("config watcher")
    watcher.setServiceParent(top)
    return top
