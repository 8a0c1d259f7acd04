"""TLS certificates and SuperNode keys for a Flower federation (needs the ``cryptography`` package,
which Flower itself depends on).

* :func:`make_tls`: a self-signed CA and a server certificate it signs, for the SuperLink's
  addresses (``--ssl-ca-certfile``, ``--ssl-certfile``, ``--ssl-keyfile``); SuperNodes and
  ``flwr`` verify the SuperLink with the CA (``--root-certificates``).
* :func:`make_node_key`: a SuperNode's key pair for ``--enable-supernode-auth``: the private key
  in OpenSSH format (``flower-supernode --auth-supernode-private-key``) and the public key
  (``flwr supernode register KEY.pub``), on the NIST P-384 curve Flower accepts.

The local federation (:class:`~fedsynsam.flower.deploy.LocalFederation` with ``secure=True``)
and ``fedsynsam flower demo --secure`` use them; on real machines, the CA's private key stays
with whoever signs the certificates, and each SuperNode's private key stays on its machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["TLSFiles", "make_tls", "make_node_key"]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA certificate, the server certificate and the server's private key."""

    ca: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by this user only (created 0600, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsynsam"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def make_tls(folder, hosts=("127.0.0.1", "localhost"), days: int = 30) -> TLSFiles:
    """A CA and a server certificate for ``hosts`` (IP addresses or DNS names), valid ``days``.

    Writes ``ca.pem``, ``server.pem`` and ``server.key`` (0600) into ``folder``; returns their paths.
    """
    if not hosts:
        raise ValueError("hosts must name at least one address of the SuperLink, e.g. ('127.0.0.1',)")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be an integer >= 1; got {days!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedsynsam local CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(hosts[0])))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TLSFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return files


def make_node_key(path) -> tuple[Path, Path]:
    """A SuperNode's key pair: ``path`` (OpenSSH private key, 0600) and ``path.pub``; returns both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return path, pub
