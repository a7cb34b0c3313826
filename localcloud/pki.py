"""A throwaway PKI for the bench: a root CA, server certificates, device certificates.

Software keys are fine here: this CA stands in for AWS IoT's and for a manufacturer's. Device keys
in tests live on tokens; the CA signs their CSRs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """A key: mode 0600 from creation (an existing file keeps its mode, so it is tightened too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            os.fchmod(f.fileno(), 0o600)
        f.write(data)


def private_dir(path: Path) -> Path:
    """A directory for keys: 0700 when created here; one made by an older version is tightened."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


@dataclass
class Issued:
    cert_path: Path
    key_path: Path | None
    cert: x509.Certificate


class CertificateAuthority:
    """A CA whose key and certificate live in `directory` (0700; keys 0600, certificates public)."""

    def __init__(self, directory: Path, name: str = "localcloud test root CA"):
        self.dir = Path(directory)
        private_dir(self.dir)
        self.name = name
        slug = name.replace(" ", "-")
        self.key_path = self.dir / f"{slug}.key"
        self.cert_path = self.dir / f"{slug}.pem"
        if self.key_path.exists() and self.cert_path.exists():
            self.key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        _write_private(
            self.key_path,
            self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _sign(
        self,
        subject_cn: str,
        public_key,
        *,
        server_names: list[str] | None = None,
        days: float = 365,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        start = not_before or (_now() - dt.timedelta(minutes=5))
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server_names is not None:
            alt: list[x509.GeneralName] = []
            for n in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def issue_server(
        self, name: str, hosts: list[str], *, days: float = 365, not_before: dt.datetime | None = None
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(hosts[0], key.public_key(), server_names=hosts, days=days, not_before=not_before)
        return self._store(name, cert, key)

    def issue_client(self, name: str, common_name: str, days: float = 365) -> Issued:
        """A client certificate with a software key (observers and other test clients, not devices)."""
        key = ec.generate_private_key(ec.SECP256R1())
        return self._store(name, self._sign(common_name, key.public_key(), days=days), key)

    def sign_csr(self, csr_pem: bytes, common_name: str | None = None, days: float = 365) -> x509.Certificate:
        """Sign a device CSR (made on its token); refuses a CSR whose self-signature is bad."""
        req = x509.load_pem_x509_csr(csr_pem)
        if not req.is_signature_valid:
            raise ValueError("CSR signature does not verify")
        if common_name is None:
            attrs = req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            common_name = attrs[0].value if attrs else "device"
        return self._sign(str(common_name), req.public_key(), days=days)

    def sign_public_key(self, public_key, common_name: str, days: float = 365) -> x509.Certificate:
        return self._sign(common_name, public_key, days=days)

    def crl(self, revoked: list[tuple[int, str]], number: int) -> bytes:
        """PEM CRL listing (serial, status); INACTIVE/PENDING certificates are 'on hold' (reversible).

        mosquitto adds each reloaded CRL to its store and OpenSSL uses the one with the latest
        lastUpdate, keeping the first on a tie. CRLs made within one second would tie, so
        lastUpdate is derived from the CRL number: 30 days before the CA, plus one second each.
        """
        now = _now()
        last = self.cert.not_valid_before_utc - dt.timedelta(days=30) + dt.timedelta(seconds=number)
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(min(last, now))
            .next_update(now + dt.timedelta(days=7))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for serial, status in revoked:
            reason = x509.ReasonFlags.key_compromise if status == "REVOKED" else x509.ReasonFlags.certificate_hold
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now)
                .add_extension(x509.CRLReason(reason), critical=False)
                .build()
            )
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def _store(self, name: str, cert: x509.Certificate, key) -> Issued:
        cert_path = self.dir / f"{name}.pem"
        key_path = self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        return Issued(cert_path, key_path, cert)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
