"""SMTP: the ESMTP protocol, its replies, and the MX policy."""
