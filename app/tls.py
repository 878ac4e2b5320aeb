"""HTTPS for annotators on other machines: browsers give a page the microphone only in a secure context
(HTTPS, or a loopback address), so `http://server:7860` cannot record.

`self_signed(folder)` makes (once, then reuses) a certificate for this machine's names and addresses,
kept with the app's data; `fingerprint(cert)` is what annotators compare with their browser's warning.
A real certificate (`--ssl-certfile/--ssl-keyfile`) or a private CA is better for a team.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from pathlib import Path

CERT_NAME, KEY_NAME = "cert.pem", "key.pem"
VALID_DAYS = 825  # browsers refuse longer-lived server certificates


def machine_names(host: str | None = None) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) this machine answers to: localhost, its host names, `host`, its addresses."""
    names = ["localhost"]
    for n in (socket.gethostname(), socket.getfqdn(), host or ""):
        if n and n not in names and not _is_ip(n) and n not in ("0.0.0.0", "::"):
            names.append(n)
    ips = ["127.0.0.1", "::1"]
    candidates = [host or ""]
    try:
        candidates += [a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        pass
    for ip in candidates:
        if _is_ip(ip) and ip not in ips and ip not in ("0.0.0.0", "::"):
            ips.append(ip)
    return names, ips


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def self_signed(folder: str | Path, host: str | None = None, extra_names: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(cert, key) in `folder`: made on first use (EC P-256, this machine's names), reused afterwards.

    A kept certificate that lacks a name asked for now (e.g. a new --host) is replaced."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    names, ips = machine_names(host)
    names += [n for n in extra_names if n not in names]
    if cert_path.is_file() and key_path.is_file():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = set(san.get_values_for_type(x509.DNSName)) | {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        fresh = cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=7)
        if fresh and set(names) | set(ips) <= have:
            return cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1] if len(names) > 1 else names[0]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Molmo Studio (self-signed)")])
    now = dt.datetime.now(dt.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName(n) for n in names] +
                                      [x509.IPAddress(ipaddress.ip_address(i)) for i in ips])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS)).add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def fingerprint(cert_path: str | Path) -> str:
    """SHA-256 fingerprint as browsers show it (AB:CD:...)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def cert_names(cert_path: str | Path) -> list[str]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName)) + [str(a) for a in san.get_values_for_type(x509.IPAddress)]
