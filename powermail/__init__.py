"""PowerMail: a mail platform for small companies, run as one Twisted application."""

__version__ = "0.1.0"
