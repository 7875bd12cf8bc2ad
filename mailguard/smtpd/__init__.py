"""The SMTP server: framing, the session, and the Twisted adapter around it."""
