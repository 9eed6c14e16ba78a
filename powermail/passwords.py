"""Password hashing: argon2id through argon2-cffi, never our own crypto."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["hash_password", "is_password_hash", "verify_password"]

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """A salted argon2id hash of ``password``, in the PHC string format."""
    return _hasher.hash(password)


def is_password_hash(text: str) -> bool:
    """Whether ``text`` looks like a hash this module can verify."""
    return text.startswith(("$argon2id$", "$argon2i$", "$argon2d$"))


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; slow on purpose."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
