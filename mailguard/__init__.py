"""mailguard: an SMTP server for Twisted that keeps spam out at the door."""

__version__ = "0.1.0"
