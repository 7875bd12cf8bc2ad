"""Durable storage: Maildirs, the relay queue, its SMTP client and DSNs."""
