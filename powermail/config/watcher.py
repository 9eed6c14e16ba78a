"""Applying edits of the configuration file to a running server.

The file is polled (its inode, size and mtime); a changed file is loaded and
validated in full.  A valid one replaces the running configuration at once:
directory, mailboxes and limits apply to the next command of every session,
and no connection is dropped.  An invalid one is logged with file, key and
reason, and the previous configuration stays in force.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from powermail.config._loader import Config, ConfigError, load_config

__all__ = ["ConfigWatcher", "RunningConfig"]

_log = Logger()


class RunningConfig:
    """The configuration in force; ``current`` is replaced, never mutated."""

    def __init__(self, config: Config) -> None:
        self.current = config
        self._listeners: list[Callable[[Config], None]] = []

    def subscribe(self, callback: Callable[[Config], None]) -> None:
        """Call ``callback(new_config)`` after each successful reload."""
        self._listeners.append(callback)

    def replace(self, config: Config) -> None:
        self.current = config
        for callback in self._listeners:
            callback(config)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ConfigWatcher(Service):
    """Polls the configuration file every ``interval`` seconds."""

    def __init__(self, running: RunningConfig, *, clock: IReactorTime) -> None:
        self.config_holder = running
        self.path = running.current.path
        self.clock = clock
        self._seen = _signature(self.path)
        # What the listeners were built from; only a restart changes them.
        self._built_from = running.current.listener_settings()
        self._loop: LoopingCall | None = None

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.config_holder.current.server.reload_interval, now=False)

    def stopService(self) -> None:  # noqa: N802
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def check(self) -> bool:
        """Reload if the file changed; return whether a new one applies."""
        signature = _signature(self.path)
        if signature == self._seen:
            return False
        self._seen = signature
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            _log.error(
                "configuration not reloaded, previous one stays in force: {error}",
                error=str(exc),
            )
            return False
        changed = [
            name
            for name, built, new in zip(
                (
                    "server.data_dir",
                    "tls",
                    "mx.listen",
                    "imap.listen",
                    "imap.tls_listen",
                    "dns.servers",
                ),
                self._built_from,
                config.listener_settings(),
                strict=True,
            )
            if built != new
        ]
        if changed:
            _log.warn(
                "configuration {path}: {keys} changed; the running server keeps the"
                " old value until it is restarted",
                path=str(self.path),
                keys=", ".join(changed),
            )
        self.config_holder.replace(config)
        _log.info(
            "configuration {path} reloaded: {domains} domains, {mailboxes} mailboxes",
            path=str(self.path),
            domains=len(config.directory.domains),
            mailboxes=len(config.directory.mailboxes),
        )
        return True
