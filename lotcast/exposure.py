"""How `lotcast up` exposes its nodes: listen address, the host in URLs, ICE address, TLS.

On loopback `up` serves plain HTTP unless asked (`--tls`, `--cert/--key`). Listening on any other
address turns TLS on by itself: a phone on the same Wi-Fi needs a secure context for
`getUserMedia`, so the pages must be HTTPS. Without `--cert/--key`, the certificate comes from
`lotcast.tls.ensure_dev_certificate` (a local CA the phone can trust once).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from lotcast.tls import DevCertificate, default_names, ensure_dev_certificate, is_loopback, lan_addresses

TRUST_ON_PHONE = (
    "iOS: open {ca_url} in Safari, allow the download, install it in Settings > General > "
    "VPN & Device Management, then turn on full trust in Settings > General > About > "
    "Certificate Trust Settings. Android: open {ca_url} (or copy {ca_path}), then Settings > "
    "Security > Encryption & credentials > Install a certificate > CA certificate."
)


@dataclass(frozen=True)
class Exposure:
    host: str  # what the nodes bind
    public_host: str  # what the printed and advertised URLs use
    ice_ip: str | None  # ICE host candidate address (None: the services' default, loopback)
    cert: str = ""
    key: str = ""
    ca_file: str = ""
    dev: DevCertificate | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tls(self) -> bool:
        return bool(self.cert)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def env(self) -> dict[str, str]:
        """LOTCAST_* settings every node `up` starts gets."""
        env = {"LOTCAST_HOST": self.host}
        if self.ice_ip:
            env["LOTCAST_ICE_IP"] = self.ice_ip
        if self.tls:
            env |= {"LOTCAST_TLS_CERT": self.cert, "LOTCAST_TLS_KEY": self.key}
        if self.ca_file:
            env["LOTCAST_CA_FILE"] = self.ca_file
        return env

    def url_args(self, port: int) -> list[str]:
        """`--public-url` for a node on `port` (0: the node fills in the port it got)."""
        return ["--public-url", f"{self.scheme}://{url_host(self.public_host)}:{port}"]


def url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _unspecified(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).is_unspecified


def wants_tls(host: str, tls_flag: bool, cert: str | None) -> bool:
    return tls_flag or bool(cert) or not is_loopback(host)


def plan_exposure(data_dir: Path, host: str = "127.0.0.1", public_host: str | None = None,
                  tls: bool = False, cert: str | None = None, key: str | None = None,
                  ca_file: str | None = None) -> Exposure:
    """Decide (and, for a dev certificate, create or reuse the files) how `up` serves."""
    if bool(cert) != bool(key):
        raise ValueError("--cert and --key go together")
    lan = lan_addresses()
    if public_host is None:
        public_host = (lan[0] if lan else "127.0.0.1") if _unspecified(host) else host
    # Media goes where the URLs point; a DNS name in the URL falls back to the bound address.
    if _is_ip(public_host):
        ice_ip: str | None = public_host
    elif not _unspecified(host):
        ice_ip = host
    else:
        ice_ip = lan[0] if lan else None
    if ice_ip is not None and is_loopback(ice_ip):
        ice_ip = None
    if not wants_tls(host, tls, cert):
        return Exposure(host, public_host, ice_ip)
    if cert and key:
        return Exposure(host, public_host, ice_ip, str(Path(cert).resolve()),
                        str(Path(key).resolve()),
                        str(Path(ca_file).resolve()) if ca_file else "",
                        notes=[f"certificate {cert} (yours; renewals are picked up live)"])
    names = default_names([public_host, *([] if _unspecified(host) else [host])])
    dev = ensure_dev_certificate(data_dir, names)
    notes = [f"certificate {dev.cert_path} ({dev.source.value}; for {', '.join(names)})",
             f"local CA {dev.ca_path} (trust it once per device)"]
    return Exposure(host, public_host, ice_ip, str(dev.cert_path), str(dev.key_path),
                    str(ca_file or dev.ca_path), dev=dev, notes=notes)


def phone_hint(exposure: Exposure, node_url: str) -> str | None:
    """How to trust the generated CA on a phone, or None when there is nothing to trust."""
    if exposure.dev is None:
        return None
    hint = TRUST_ON_PHONE.format(ca_url=f"{node_url.rstrip('/')}/ca.crt",
                                 ca_path=exposure.dev.ca_path)
    if is_loopback(exposure.public_host):
        hint += " A phone reaches this machine only when up listens on the LAN (--host 0.0.0.0)."
    return hint
