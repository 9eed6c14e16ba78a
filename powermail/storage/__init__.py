"""Durable mail storage: Maildir delivery (and, later, Maildir++ folders)."""
