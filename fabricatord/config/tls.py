"""`[tls]`'s files read and checked (PEM, every certificate of a file, the key the
certificate's and not encrypted, when it expires), and the client context of every TLS
association we open. The server side, which Twisted serves with pyOpenSSL, is made from the
same files by `fabricatord.servers.tls`.

The profiles are PS3.15 B.12 and B.13 (BCP 195 with RFC 8996 and 9325): TLS 1.2 or later,
1.3 preferred (OpenSSL's TLS 1.3 suites, all AEAD), and for TLS 1.2 only ECDHE with AES-GCM,
what B.13 permits and what DCMTK 3.6.7's non-downgrading BCP 195 profile offers. DHE is left
out (B.13 allows it only where the key length is set, 2048 bits or more). Host names are not
checked, as DCMTK does not: a peer is trusted for a certificate `ca` signed."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from fabricatord.config.schema import Settings, TlsSettings

TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
)
"""OpenSSL's names of TLS_ECDHE_{ECDSA,RSA}_WITH_AES_{128_GCM_SHA256,256_GCM_SHA384}."""


def enabled(tls: TlsSettings) -> bool:
    """A certificate is set: the TLS listeners open."""
    return bool(tls.certificate.name)


def problems(settings: Settings) -> Iterator[tuple[str, str]]:
    """Every `[tls]` key that cannot be used, by name, and what needs TLS without it."""
    tls = settings.tls
    if enabled(tls) != bool(tls.private_key.name):
        missing = "private_key" if enabled(tls) else "certificate"
        yield f"tls.{missing}", "a certificate needs its private key, and a key its certificate"
    found = {
        "certificate": _certificates(tls.certificate),
        "private_key": _key(tls.private_key),
        "ca": _certificates(tls.ca),
    }
    for name, problem in found.items():
        if problem:
            yield f"tls.{name}", problem
    if enabled(tls) and tls.private_key.name and not found["certificate"] and not found["private_key"]:
        try:
            ssl.create_default_context().load_cert_chain(tls.certificate, tls.private_key)
        except (ssl.SSLError, OSError) as exc:
            yield "tls.private_key", f"not the key of {tls.certificate}: {getattr(exc, 'reason', None) or exc}"
    if enabled(tls) and tls.verify_client and not tls.ca.name:
        yield "tls.ca", "verify_client needs the certificates clients are checked against (or verify_client = false)"
    for index, peer in enumerate(settings.peers):
        if peer.tls and not (enabled(tls) and tls.ca.name):
            yield f"peers[{index}].tls", "a TLS peer needs [tls] certificate, private_key and ca"
    for section in ("dicom", "hl7", "http"):
        if not getattr(settings, section).plain and not enabled(tls):
            yield f"{section}.plain", "false leaves no port open: TLS needs [tls] certificate and private_key"


def _certificates(path: Path) -> str:
    """Why a PEM file of certificates cannot be used (every one of them parsed), or empty."""
    if not path.name:
        return ""
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except ValueError as exc:
        return f"{path} is not a PEM file of certificates: {exc}"
    return ""


def _key(path: Path) -> str:
    """Why a PEM private key cannot be used (an encrypted one would stop the start for a
    pass phrase nobody types), or empty."""
    if not path.name:
        return ""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        load_pem_private_key(path.read_bytes(), None)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except TypeError:
        return f"{path} is encrypted: give the key without a pass phrase (and keep the file 0600)"
    except ValueError as exc:
        return f"{path} is not a PEM private key: {exc}"
    return ""


def not_after(path: Path) -> datetime:
    """When the first certificate of a PEM file expires (UTC)."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """For associations we request over TLS: the peer verified against `ca`, and our own
    certificate trusted too (our node reached as `self` over its TLS port whatever `ca`
    holds); our certificate presented (DCMTK's storescp asks for one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.set_ciphers(TLS12_CIPHERS)
    if tls.ca.name:
        context.load_verify_locations(cafile=str(tls.ca))
    context.load_verify_locations(cafile=str(tls.certificate))
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context
