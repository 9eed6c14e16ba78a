"""docs/operations.md stays true to the defaults declared in the schema."""

from __future__ import annotations

from pathlib import Path

from powermail.config._schema import SECTIONS

DOC = (Path(__file__).resolve().parent.parent / "docs/operations.md").read_text()


def test_every_mx_limit_is_documented_with_its_default():
    for name, key in SECTIONS["mx"].items():
        if name == "listen":
            continue
        assert f"| `{name}` | `{key.default}`" in DOC, name


def test_every_imap_limit_is_documented_with_its_default():
    for name, key in SECTIONS["imap"].items():
        default = key.default[0] if name in ("listen", "tls_listen") else key.default
        assert f"| `{name}` | `{default}`" in DOC, name
