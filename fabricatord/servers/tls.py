"""TLS on our listeners: one pyOpenSSL context from `[tls]` for DICOM, MLLP and HTTPS, made
again on SIGHUP (new connections get the new certificate, open ones keep theirs), and a log
line for every handshake that fails, so that a peer with the wrong certificate is named."""

from __future__ import annotations

import time
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from fabricatord.config import Settings
from fabricatord.config.tls import TLS12_CIPHERS, enabled, not_after
from fabricatord.obs import metrics
from fabricatord.obs.logging import get_logger

log = get_logger(__name__)

EXPIRY_WARNING = 14 * 86400
"""A certificate that expires within this many seconds is warned of at start and on SIGHUP."""


@implementer(IOpenSSLServerConnectionCreator)
class ServerTls:
    """The server side of `[tls]`, for every listener of this process."""

    def __init__(self, settings: Settings) -> None:
        self._context = _context(settings)
        _watch_expiry(settings)

    def reload(self, settings: Settings) -> None:
        """New certificate files (SIGHUP): connections from now on get them; a file that no
        longer loads keeps the old context, with an error in the log."""
        try:
            self._context = _context(settings)
        except Exception as exc:  # a file the check passed and OpenSSL refused: the old one serves on
            log.error("TLS certificate not reloaded, the old one stays", error=str(exc))
            return
        _watch_expiry(settings)
        log.info("TLS certificate reloaded", certificate=str(settings.tls.certificate))

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def wrap(self, factory: Any, listener: str) -> TLSMemoryBIOFactory:
        """`factory`'s protocol behind TLS; a failed handshake logged and counted for `listener`."""
        wrapped = _Refusing(self, False, factory)  # type: ignore[arg-type]  # zope, not a class
        wrapped.protocol = _logged(listener)
        return wrapped


class _Refusing(TLSMemoryBIOFactory):
    """A connection the wrapped factory turns away (`allowed_hosts`) is closed, not wrapped."""

    def buildProtocol(self, addr: Any) -> Any:
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)


def of(settings: Settings) -> ServerTls | None:
    """The listeners' TLS when `[tls]` has a certificate."""
    return ServerTls(settings) if enabled(settings.tls) else None


def _context(settings: Settings) -> SSL.Context:
    tls = settings.tls
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS.encode())
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    context.use_certificate_chain_file(str(tls.certificate))
    context.use_privatekey_file(str(tls.private_key))
    context.check_privatekey()
    if tls.ca.name:
        context.load_verify_locations(str(tls.ca))
    if tls.verify_client:
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _as_verified)
    context.set_session_id(b"fabricatord")
    return context


def _as_verified(connection: Any, certificate: Any, error: int, depth: int, ok: int) -> bool:
    """OpenSSL's own verdict on the chain (against `ca`); host names are not checked."""
    return bool(ok)


def _watch_expiry(settings: Settings) -> None:
    expires = not_after(settings.tls.certificate).timestamp()
    metrics.TLS_CERTIFICATE_EXPIRY.set(expires)
    left = expires - time.time()
    if left < EXPIRY_WARNING:
        log.warning(
            "TLS certificate expires soon" if left > 0 else "TLS certificate has expired",
            certificate=str(settings.tls.certificate),
            days_left=round(left / 86400, 1),
        )


CLOSE_GRACE = 2.0
"""Seconds a closing TLS connection waits for the peer's close_notify before it is cut: a
silent or paused peer must not hold the connection (timeouts close through here)."""


def _logged(listener: str) -> type[BufferingTLSTransport]:
    class Logged(BufferingTLSTransport):
        _cut: Any = None

        def loseConnection(self) -> None:
            super().loseConnection()
            if self.connected and self._cut is None:
                self.resumeProducing()  # the close_notify answer must be read
                self._cut = cast(Any, reactor).callLater(CLOSE_GRACE, self._give_up)

        def _give_up(self) -> None:
            self._cut = None
            if self.connected:
                self.abortConnection()

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            if self._cut is not None and self._cut.active():
                self._cut.cancel()
            why = getattr(self, "_reason", None) or reason
            if not getattr(self, "_handshakeDone", False) and isinstance(why.value, SSL.Error):
                peer = self.getPeer()
                log.warning(
                    "TLS handshake failed",
                    listener=listener,
                    peer=f"{peer.host}:{peer.port}",
                    error=why.getErrorMessage(),
                )
                metrics.TLS_HANDSHAKE_FAILURES.labels(listener).inc()
            super().connectionLost(reason)

    return Logged
