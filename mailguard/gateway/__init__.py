"""Anti-spam gateway mode: ask the back-end (VRFY, cached) before accepting."""
