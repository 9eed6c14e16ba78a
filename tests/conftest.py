"""Shared fixtures: the checkout on sys.path, and a running PowerMail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO, REPO / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from powermail_process import PowerMail, write_config  # noqa: E402


@pytest.fixture(scope="module")
def shared_powermail(tmp_path_factory):
    """One server for a whole test module, for tests that change nothing."""
    config = write_config(tmp_path_factory.mktemp("powermail"))
    server = PowerMail(config)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def powermail(tmp_path):
    """A real `twistd powermail` on a free loopback port, stopped after the test."""
    config = write_config(tmp_path)
    server = PowerMail(config)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def limited(tmp_path):
    """Start servers whose [mx] section gets extra lines (limits under test)."""
    servers = []

    def start(mx_extra: str) -> PowerMail:
        server = PowerMail(
            write_config(tmp_path / f"s{len(servers)}", mx_extra=mx_extra)
        )
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
