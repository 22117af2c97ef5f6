"""TLS for the nodes: the one-machine CA and server certificate, server contexts, live reload.

`ensure_dev_certificate()` keeps a small CA and a server certificate signed by it in
``<data dir>/tls/`` (keys mode 0600). The CA is made once and reused, so a phone that trusts it
once keeps trusting every later server certificate; the server certificate is reused while it is
signed by that CA, covers every current address and has more than `RENEW_BEFORE` left, and is
issued again otherwise (a new Wi-Fi address, expiry).

`CertificateReloader` watches the certificate and key files a node serves (a mounted Kubernetes
Secret, a certbot directory) and loads a renewed pair into the live `ssl.SSLContext`: new
handshakes get the new certificate, connections already open keep theirs and are never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import ipaddress
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

TLS_DIR = "tls"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CA_LIFETIME = datetime.timedelta(days=3650)
# Apple platforms refuse TLS server certificates valid for more than 825 days; stay well under.
SERVER_LIFETIME = datetime.timedelta(days=397)
RENEW_BEFORE = datetime.timedelta(days=30)
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class CertSource(enum.Enum):
    CREATED = "created"  # no usable CA: a new CA and server certificate
    ISSUED = "issued"  # the CA was reused; the server certificate was (re)issued
    REUSED = "reused"  # both files were valid for the current names


@dataclass(frozen=True)
class DevCertificate:
    ca_path: Path
    cert_path: Path
    key_path: Path
    names: tuple[str, ...]
    source: CertSource


# --- the machine's names --------------------------------------------------------------------


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback and link-local, in interface order."""
    found: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family != socket.AF_INET:
                continue
            ip = ipaddress.ip_address(a.address)
            if ip.is_loopback or ip.is_link_local or ip.is_unspecified or a.address in found:
                continue
            found.append(a.address)
    return found


def host_names() -> list[str]:
    """The hostname and its mDNS name (``<host>.local``), when the hostname is a DNS label."""
    host = socket.gethostname().split(".", 1)[0]
    if not _LABEL.match(host) or host == "localhost":
        return []
    return [host, f"{host}.local"]


def default_names(extra: Iterable[str] = ()) -> list[str]:
    """What a one-machine certificate covers: loopback, the LAN addresses, the host names."""
    names: list[str] = []
    for name in [*LOOPBACK_NAMES, *extra, *lan_addresses(), *host_names()]:
        if name and name not in names and not _is_unspecified(name):
            names.append(name)
    return names


def _is_unspecified(name: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(name).is_unspecified
    return False


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: `up` serves plain HTTP only there."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def certificate_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses in a certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))}


# --- files ----------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically replace `path` (never a moment with a half-written key or a wider mode)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate,
                                                            ec.EllipticCurvePrivateKey] | None:
    """The certificate and its EC key, or None when either is missing, unreadable or unmatched."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _valid_for(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - RENEW_BEFORE > now


# --- issuing --------------------------------------------------------------------------------


def _new_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname().split(".", 1)[0] or "this machine"
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lotcast"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"lotcast local CA ({host})"[:64])])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue_server_certificate(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: Sequence[str],
    now: datetime.datetime | None = None, lifetime: datetime.timedelta = SERVER_LIFETIME,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A serverAuth certificate for `names` (DNS names and IP addresses) signed by the CA."""
    if not names:
        raise ValueError("a server certificate needs at least one name")
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ensure_dev_certificate(data_dir: Path, names: Sequence[str],
                           now: datetime.datetime | None = None) -> DevCertificate:
    """The CA and server certificate in ``<data_dir>/tls``, made or renewed as needed."""
    now = now or datetime.datetime.now(datetime.UTC)
    directory = data_dir / TLS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    paths = DevCertificate(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY,
                           tuple(names), CertSource.REUSED)
    ca = _load_pair(paths.ca_path, directory / CA_KEY)
    source = CertSource.ISSUED
    if ca is None or not _valid_for(ca[0], now):
        ca = _new_ca(now)
        _write(directory / CA_KEY, _key_pem(ca[1]), 0o600)
        _write(paths.ca_path, ca[0].public_bytes(serialization.Encoding.PEM), 0o644)
        source = CertSource.CREATED
    else:
        server = _load_pair(paths.cert_path, paths.key_path)
        if (server is not None and _valid_for(server[0], now) and signed_by(server[0], ca[0])
                and set(names) <= certificate_names(server[0])):
            return paths
    cert, key = issue_server_certificate(ca[0], ca[1], names, now)
    # Key first: a reader that sees the new certificate also finds its key.
    _write(paths.key_path, _key_pem(key), 0o600)
    _write(paths.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return DevCertificate(paths.ca_path, paths.cert_path, paths.key_path, tuple(names), source)


# --- serving --------------------------------------------------------------------------------


def server_context(cert_path: str | Path, key_path: str | Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context serving the given PEM certificate (chain) and key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """A verifying client context: `ca_file` as the only trust anchors, else the system store."""
    if ca_file:
        return ssl.create_default_context(cafile=str(ca_file))
    return ssl.create_default_context()


def certificate_serial(path: str | Path) -> int:
    return int(x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number)


Signature = tuple[tuple[int, int, int], tuple[int, int, int]]


class CertificateReloader:
    """Polls a certificate/key pair and loads a changed one into a live server context.

    A change is any new (inode, mtime, size) of either file, which also catches the symlink swap
    of a Kubernetes Secret volume. The new pair is first copied into a private snapshot and
    loaded into a scratch context: only a complete, matching pair reaches the live context, so a
    renewal caught half-written (the certificate replaced, the key not yet) keeps the old pair
    serving and is retried at the next change.
    """

    def __init__(self, context: ssl.SSLContext, cert_path: str | Path, key_path: str | Path,
                 interval: float = 5.0) -> None:
        self.context = context
        self.cert_path = Path(cert_path)
        self.key_path = Path(key_path)
        self.interval = interval
        self.reloads = 0
        self.failures = 0
        self.serial: int | None = None
        self._seen = self._signature()
        self._task: asyncio.Task[None] | None = None

    def _signature(self) -> Signature | None:
        try:
            c, k = os.stat(self.cert_path), os.stat(self.key_path)
        except OSError:
            return None
        return (c.st_ino, c.st_mtime_ns, c.st_size), (k.st_ino, k.st_mtime_ns, k.st_size)

    def check(self) -> bool:
        """One poll: True when a new pair went live."""
        signature = self._signature()
        if signature is None or signature == self._seen:
            return False
        self._seen = signature
        snapshot = Path(tempfile.mkdtemp(prefix="lotcast-tls-"))
        try:
            cert, key = snapshot / "cert.pem", snapshot / "key.pem"
            shutil.copyfile(self.cert_path, cert)
            shutil.copyfile(self.key_path, key)
            server_context(cert, key)  # raises on a partial or mismatched pair
            self.context.load_cert_chain(str(cert), str(key))
            self.serial = certificate_serial(cert)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.failures += 1
            log.warning("TLS certificate %s changed but cannot be loaded (%s); still serving the "
                        "previous one", self.cert_path, exc)
            return False
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
        self.reloads += 1
        log.info("TLS certificate reloaded from %s (serial %x)", self.cert_path, self.serial)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a poll must never end the watch
                log.exception("TLS certificate check failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
