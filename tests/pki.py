"""Certificates for the TLS tests, made with `cryptography`: a CA, a server and a client it
signed, and a stranger another CA signed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


@dataclass
class Material:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate another CA signed."""
    stranger_key: Path


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(folder: Path, name: str, certificate: Any, key: Any) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _certificate(subject: str, key: Any, issuer: tuple[str, Any] | None, days: float, ca: bool = False) -> Any:
    """A certificate for `subject`, signed by `issuer` (name, key) or by itself."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer_name, signer_key = issuer if issuer else (subject, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, signer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(signer_key, hashes.SHA256())


def make_material(folder: Path, server_days: float = 365) -> Material:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = _key(), _key()
    ca, _ = _write(folder, "ca", _certificate("Test CA", ca_key, None, 3650, ca=True), ca_key)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _write(
        folder, "server", _certificate("fabricatord", server_key, ("Test CA", ca_key), server_days), server_key
    )
    client = _write(folder, "client", _certificate("modality", client_key, ("Test CA", ca_key), 365), client_key)
    stranger = _write(
        folder, "stranger", _certificate("stranger", stranger_key, ("Other CA", other_key), 365), stranger_key
    )
    return Material(ca, *server, *client, *stranger)


def reissue(material: Material, days: float = 365) -> None:
    """A new server certificate from the same CA, in the same files."""
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key((material.ca.parent / "ca.key").read_bytes(), None)
    key = _key()
    _write(material.server_cert.parent, "server", _certificate("fabricatord", key, ("Test CA", ca_key), days), key)
