"""TLS contexts from PEM files (pyOpenSSL), TLS 1.2 or newer only."""

from __future__ import annotations

from twisted.internet import ssl


class TLSConfigError(ValueError):
    pass


def load_context(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """A server context for STARTTLS and implicit TLS.

    C{cert_path} may hold the certificate followed by its chain.
    """
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSConfigError(f"{e.filename}: {e.strerror}") from None
    try:
        certs = ssl.Certificate.loadPEM(cert_pem)
        key = ssl.KeyPair.load(key_pem, ssl.crypto.FILETYPE_PEM)
        chain = _chain(cert_pem)
        return ssl.CertificateOptions(
            privateKey=key.original,
            certificate=certs.original,
            extraCertChain=[c.original for c in chain],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except Exception as e:  # OpenSSL errors have no useful common base
        raise TLSConfigError(f"{cert_path}/{key_path}: not a usable certificate and key: {e}") from None


def _chain(pem: bytes) -> list[ssl.Certificate]:
    marker = b"-----BEGIN CERTIFICATE-----"
    parts = [marker + p for p in pem.split(marker)[1:]]
    return [ssl.Certificate.loadPEM(p) for p in parts[1:]]
