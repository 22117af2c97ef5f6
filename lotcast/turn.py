"""TURN for peers whose UDP is blocked: coturn with the TURN REST shared-secret scheme.

Credentials (coturn's ``use-auth-secret``): the username is ``"<expiry unix time>:<user>"`` and
the credential is ``base64(HMAC-SHA1(static-auth-secret, username))``. A node mints a pair for
every answer it gives (`mint_credentials`); coturn recomputes the HMAC with the same secret and
refuses the pair once its expiry has passed. coturn checks this when an allocation is created
(and keeps the key for that allocation afterwards), so the TTL bounds how long a minted pair may
be used to start relaying, not how long a relayed session lasts. The secret itself never leaves
the node.

`CoturnServer` runs a real ``turnserver`` child bound to loopback with UDP, TCP and TLS
listeners, for `lotcast up --turn` and the tests, the way `RedisServer` runs Redis. Production
runs coturn from k8s/components/turn with the same settings.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aioice import stun

from lotcast.daemon import OwnedDaemon
from lotcast.supervisor import die_with_parent

TURN_SCHEMES = ("turn:", "turns:")
DEFAULT_REALM = "lotcast"


class TurnConfigError(ValueError):
    """TURN settings that cannot work (a URL that is not turn:/turns:, URLs without a secret)."""


@dataclass(frozen=True)
class TurnCredentials:
    username: str
    credential: str
    expires_at: int  # unix time; coturn refuses new allocations with this pair after it


def mint_credentials(secret: str, user: str, ttl: float, now: float | None = None) -> TurnCredentials:
    """A TURN REST username/credential pair for `user`, valid for `ttl` seconds from `now`."""
    if not secret:
        raise TurnConfigError("a TURN secret is needed to mint credentials")
    if not user or ":" in user:
        raise TurnConfigError(f"TURN user must be non-empty and free of ':' (got {user!r})")
    expires_at = int((time.time() if now is None else now) + ttl)
    username = f"{expires_at}:{user}"
    return TurnCredentials(username, turn_password(secret, username), expires_at)


def turn_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def check_turn_settings(urls: list[str], secret: str, ttl: float) -> None:
    """Raise TurnConfigError for settings a node must not start with."""
    for url in urls:
        if not url.startswith(TURN_SCHEMES):
            raise TurnConfigError(f"turn URL {url!r} must start with turn: or turns:")
        if any(c in url for c in '<>", '):
            raise TurnConfigError(f"turn URL {url!r} contains a character a Link header cannot carry")
    if urls and not secret:
        raise TurnConfigError("turn_urls are set but turn_secret is empty (LOTCAST_TURN_SECRET)")
    if urls and ttl <= 0:
        raise TurnConfigError(f"turn_ttl must be positive, got {ttl}")


# --- a coturn child process -------------------------------------------------------------------


class TurnServerNotFoundError(RuntimeError):
    pass


def find_turnserver() -> str:
    path = shutil.which("turnserver") or ("/usr/bin/turnserver"
                                          if os.access("/usr/bin/turnserver", os.X_OK) else None)
    if path is None:
        raise TurnServerNotFoundError(
            "turnserver not found: install coturn (apt-get install coturn; scripts/setup.sh does)")
    return path


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP a moment ago (coturn listens on both, and cannot bind 0)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both TCP and UDP")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on `port` over TCP or UDP (a TCP port in TIME_WAIT counts as free)."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def self_signed_certificate(cert_path: Path, key_path: Path, names: list[str]) -> None:
    """A self-signed certificate for the TURNS listener (loopback: nothing verifies it against
    a CA; `up --tls` may pass its own certificate instead). Key written mode 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lotcast turn")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=397))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class CoturnServer(OwnedDaemon):
    """One coturn process on loopback, owned by whoever created it.

    Listens on `port` (UDP and TCP) and `tls_port` (TLS), relays from 127.0.0.1 and allows
    loopback peers (the nodes' ICE candidates are on 127.0.0.1 here; coturn refuses loopback peers
    otherwise). `udp`/`tcp`/`tls` turn listeners off, as a network that blocks them would.
    """

    name = "turn"

    def __init__(self, data_dir: Path | None = None, secret: str | None = None,
                 port: int | None = None, tls_port: int | None = None, udp: bool = True,
                 tcp: bool = True, tls: bool = True, cert: Path | None = None,
                 key: Path | None = None, realm: str = DEFAULT_REALM,
                 supervised: bool = False) -> None:
        self.supervised = supervised
        super().__init__()
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lotcast-turn-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # the config file holds the secret
        self.secret = secret or secrets.token_urlsafe(32)
        self.udp, self.tcp, self.tls = udp, tcp, tls
        if not (udp or tcp or tls):
            raise TurnConfigError("coturn needs at least one listener")
        self.port = port or free_udp_tcp_port()
        self.tls_port = tls_port or free_udp_tcp_port()
        self.realm = realm
        self.cert, self.key = cert, key

    @property
    def urls(self) -> list[str]:
        """The ICE server URLs to advertise, one per listener."""
        urls = []
        if self.udp:
            urls.append(f"turn:127.0.0.1:{self.port}?transport=udp")
        if self.tcp:
            urls.append(f"turn:127.0.0.1:{self.port}?transport=tcp")
        if self.tls:
            urls.append(f"turns:127.0.0.1:{self.tls_port}?transport=tcp")
        return urls

    @property
    def log_path(self) -> Path:
        return self.data_dir / "turnserver.log"

    def config(self) -> str:
        """The turnserver.conf this server runs with (it holds the secret: written 0600)."""
        lines = [
            "listening-ip=127.0.0.1",
            "relay-ip=127.0.0.1",
            f"listening-port={self.port}",
            f"tls-listening-port={self.tls_port}",
            # the nodes' candidates are loopback addresses here; nothing else is a peer
            "allow-loopback-peers",
            "no-multicast-peers",
            "use-auth-secret",
            f"static-auth-secret={self.secret}",
            f"realm={self.realm}",
            "fingerprint",
            "no-cli",
            "no-rfc5780",
            "no-stun-backward-compatibility",
            "no-software-attribute",
            "no-tlsv1",
            "no-tlsv1_1",
            "no-dtls",
            "no-tcp-relay",
            "stale-nonce=600",
            f"userdb={self.data_dir / 'turndb'}",
            f"pidfile={self.data_dir / 'turnserver.pid'}",
            f"log-file={self.log_path}",
            "simple-log",
            "no-stdout-log",
        ]
        if not self.udp:
            lines.append("no-udp")
        if not self.tcp:
            lines.append("no-tcp")
        if self.tls:
            cert, key = self._certificate()
            lines += [f"cert={cert}", f"pkey={key}"]
        else:
            lines.append("no-tls")
        return "\n".join(lines) + "\n"

    def _certificate(self) -> tuple[Path, Path]:
        if self.cert is not None and self.key is not None:
            return self.cert, self.key
        cert, key = self.data_dir / "turn.crt", self.data_dir / "turn.key"
        if not (cert.exists() and key.exists()):
            self_signed_certificate(cert, key, ["127.0.0.1", "localhost"])
        return cert, key

    def start(self, timeout: float = 10.0) -> None:
        # coturn logs a port it cannot bind and runs on; another server's answer on that port
        # must not pass for ours
        for port in (self.port, self.tls_port):
            if not port_free(port):
                raise RuntimeError(f"TURN port {port} is in use on 127.0.0.1 (a system coturn? "
                                   "`systemctl disable --now coturn`)")
        conf = self.data_dir / "turnserver.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config())
        self.log_path.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [find_turnserver(), "-c", str(conf)], stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGTERM) if self.supervised else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"turnserver exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            if self._answers_binding():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"turnserver did not answer a STUN binding on port {self.port} in "
                           f"{timeout}s: {self.log_tail()}")

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def _answers_binding(self) -> bool:
        """A STUN Binding request answered on the main listener (UDP, else TCP), else TLS port
        accepting connections."""
        request = bytes(stun.Message(message_method=stun.Method.BINDING,
                                     message_class=stun.Class.REQUEST))
        try:
            if self.udp:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(0.3)
                    sock.sendto(request, ("127.0.0.1", self.port))
                    return _is_binding_success(sock.recv(2048))
            if self.tcp:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(request)
                    return _is_binding_success(sock.recv(2048))
            with socket.create_connection(("127.0.0.1", self.tls_port), timeout=0.5):
                return True
        except OSError:
            return False


    def describe(self) -> str:
        return f"pid {self.pid}; " + ", ".join(self.urls)


def _is_binding_success(data: bytes) -> bool:
    try:
        message = stun.parse_message(data)
    except ValueError:
        return False
    return (message.message_method == stun.Method.BINDING
            and message.message_class == stun.Class.RESPONSE)
