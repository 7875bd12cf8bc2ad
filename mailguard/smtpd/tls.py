"""TLS contexts from PEM files (pyOpenSSL), TLS 1.2 or newer only.

The server side needs no service-identity: it presents a certificate and
does not verify clients.  The relay queue's client side verifies the
back-end with service-identity (``mailguard.store.queue``).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer


class TLSConfigError(ValueError):
    pass


def load_context(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """A server context for STARTTLS and implicit TLS.

    C{cert_path} may hold the certificate followed by its chain; C{key_path}
    an unencrypted PEM private key.  The context is built here, so that a
    key that does not match the certificate is refused at start-up rather
    than at the first handshake.

    @raise TLSConfigError: naming the files and the problem.
    """
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSConfigError(f"{e.filename}: {e.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
        key = load_pem_private_key(key_pem, password=None)
    except Exception as e:
        raise TLSConfigError(f"{cert_path}/{key_path}: not a PEM certificate and unencrypted key: {e}") from None
    try:
        return _options(key, certs)
    except TypeError:
        # pyOpenSSL before 24.3 takes only its own certificate/key types.
        try:
            return _options(crypto.PKey.from_cryptography_key(key),
                            [crypto.X509.from_cryptography(c) for c in certs])
        except Exception as e:
            raise TLSConfigError(f"{cert_path}/{key_path}: not a usable certificate and key: {e}") from None
    except Exception as e:  # OpenSSL errors have no useful common base
        raise TLSConfigError(f"{cert_path}/{key_path}: not a usable certificate and key: {e}") from None


def _options(key, certs) -> ssl.CertificateOptions:
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=list(certs[1:]),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    options.getContext()  # built lazily otherwise; checks the key matches
    return options


@implementer(IOpenSSLContextFactory)
class CurrentContext:
    """The TLS context of the current generation, for implicit TLS
    (C{--smtps} over a plain endpoint): Twisted asks for the context at
    each connection, so a certificate loaded again by a reload is used
    from the next connection on.

    @param current: C{() -> CertificateOptions}."""

    def __init__(self, current) -> None:
        self._current = current

    def getContext(self):
        return self._current().getContext()
