"""TLS for the listeners: the configured certificate, or a self-signed one.

On a fresh machine no certificate is configured, so the first start makes a
self-signed pair under ``data_dir/tls/`` with the ``cryptography`` library;
later starts reuse it.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl

__all__ = ["ensure_self_signed", "server_tls_options"]


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return (certificate, key) paths in ``directory``, made if missing."""
    cert_path = directory / "selfsigned.crt"
    key_path = directory / "selfsigned.key"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, key_pem)
    _write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    partial = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def server_tls_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """Server-side TLS options from PEM files (a chain may follow the leaf).

    Raises ValueError with a readable reason when the files do not load.
    """
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        certificates = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot load certificate or key: {exc}") from None
    leaf, *extra = (crypto.X509.from_cryptography(c) for c in certificates)
    if (
        leaf.to_cryptography().public_key().public_numbers()
        != key.public_key().public_numbers()
    ):
        raise ValueError("the private key does not match the certificate")
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=leaf,
        extraCertChain=extra,
    )
