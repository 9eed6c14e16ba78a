"""The IMAP4rev1 server over the local Maildirs."""
