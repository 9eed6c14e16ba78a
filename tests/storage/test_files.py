"""The durable file primitives, on real file systems."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from powermail.storage.files import link_or_copy

SHM = Path("/dev/shm")


def test_link_or_copy_links_on_one_file_system(tmp_path):
    source = tmp_path / "a"
    source.write_bytes(b"mail\r\n")
    link_or_copy(source, tmp_path / "b")
    assert os.stat(tmp_path / "b").st_ino == os.stat(source).st_ino


@pytest.mark.skipif(
    not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tempfile.gettempdir()).st_dev,
    reason="needs /dev/shm on a file system of its own",
)
@pytest.mark.parametrize("through", [False, True])
def test_link_or_copy_copies_across_file_systems(tmp_path, through):
    """Linking fails with EXDEV: a private copy, mtime kept, through a
    staging name when one is given."""
    with tempfile.TemporaryDirectory(dir=SHM) as other:
        source = Path(other) / "a"
        source.write_bytes(b"mail\r\n")
        staging = tmp_path / "staging" if through else None
        link_or_copy(source, tmp_path / "b", through=staging, mtime=1700000000.0)
        copy = tmp_path / "b"
        assert copy.read_bytes() == b"mail\r\n"
        assert copy.stat().st_mode & 0o777 == 0o600
        assert copy.stat().st_mtime == 1700000000.0
        assert not (tmp_path / "staging").exists()
