"""`lotcast` command line: up, broadcaster, relay, token."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lotcast.auth import Role, TokenAuthority
from lotcast.config import DEV_JWT_SECRET, Settings
from lotcast.devsecret import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    SECRET_ENV,
    SecretSource,
    data_dir,
    explicit_secret,
    load_or_create,
    read_secret,
    secret_path,
)
from lotcast.exposure import phone_hint, plan_exposure

if TYPE_CHECKING:
    from lotcast.supervisor import Supervisor
    from lotcast.turn import CoturnServer

# Every Settings field is a flag on both services; these only mean something on a relay.
RELAY_ONLY = {"origin_url", "max_viewers", "origin_fanout", "workers"}
BROADCASTER_ONLY = {"max_streams"}
SERVICE_FLAGS = {
    "broadcaster": [f.name for f in fields(Settings) if f.name not in RELAY_ONLY],
    "relay": [f.name for f in fields(Settings) if f.name not in BROADCASTER_ONLY],
}
# Shorter spellings of some settings flags (the long form works too).
FLAG_ALIASES = {"tls_cert": ["--cert"], "tls_key": ["--key"]}


def _add_settings_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    defaults = Settings()
    for f in fields(Settings):
        if f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        flags = [flag, *FLAG_ALIASES.get(f.name, [])]
        env = f"LOTCAST_{f.name.upper()}"
        default = getattr(defaults, f.name)
        help_text = f"(env {env}; default {default!r})"
        if f.type == "bool":
            parser.add_argument(*flags, dest=f.name, action="store_true", default=None,
                                help=help_text)
        elif f.type.startswith("list"):
            parser.add_argument(*flags, dest=f.name, action="append", default=None, help=help_text)
        else:
            kind: Any = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=help_text)


def _settings_from(args: argparse.Namespace, names: list[str]) -> Settings:
    return Settings.from_env(**{name: getattr(args, name, None) for name in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lotcast", description="Low-latency live broadcast and auction platform."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run Redis, the broadcaster and relays on this machine",
                        description="Start a real Redis, the broadcaster and N relays on loopback, "
                        "then print the host page URL, the viewer page URL and a host token.")
    up.add_argument("--broadcaster-port", type=int, default=8080)
    up.add_argument("--relay-port", type=int, default=8081,
                    help="first relay port; relay i listens on relay-port + i (0 = any free port; "
                    "moved past the origins' ports when they overlap)")
    up.add_argument("--relays", type=int, default=1)
    up.add_argument("--origins", type=int, default=1,
                    help="broadcasters (origins); origin i listens on broadcaster-port + i; WHIP "
                    "POSTs are placed on the least-loaded one (docs/operations.md, several origins)")
    up.add_argument("--stream", default="main", help="stream id used in the printed URLs")
    up.add_argument("--data-dir", default=None,
                    help=f"where Redis keeps its AOF and up keeps the dev JWT secret "
                    f"(env {DATA_DIR_ENV}; default {DEFAULT_DATA_DIR})")
    up.add_argument("--redis-url", default=None,
                    help="use this Redis instead of starting one (env LOTCAST_REDIS_URL)")
    up.add_argument("--redis-cluster", type=int, default=0, metavar="N",
                    help="start a Redis Cluster of N primaries + N replicas (N >= 3) on loopback "
                    "ports 7000.. instead of one Redis (docs/operations.md, Redis Cluster)")
    up.add_argument("--redis-cluster-port", type=int, default=7000,
                    help="first Redis Cluster node port; node i on port + i, its bus on + 10000 "
                    "(0 = any free ports, for a throwaway data dir)")
    up.add_argument("--max-viewers", type=int, default=500,
                    help="viewers per relay (split between its workers)")
    up.add_argument("--workers", type=int, default=1,
                    help="worker processes per relay, sharing its port (0 = one per usable CPU)")
    tls = up.add_argument_group("HTTPS", "serve every node over HTTPS/WSS (automatic when "
                                "--host is not a loopback address)")
    tls.add_argument("--host", default="127.0.0.1",
                     help="address the nodes listen on (0.0.0.0: every interface)")
    tls.add_argument("--public-host", default=None,
                     help="host name or address in the URLs (default: --host, or the first LAN "
                     "address for 0.0.0.0)")
    tls.add_argument("--tls", action="store_true",
                     help="HTTPS with a certificate from a local CA kept in the data dir")
    tls.add_argument("--cert", default=None, help="your PEM certificate (chain) instead")
    tls.add_argument("--key", default=None, help="its PEM key")
    tls.add_argument("--ca-file", default=None,
                     help="CA bundle the nodes trust for their requests to each other")

    turn = up.add_argument_group("TURN", "run coturn on loopback and advertise it to every "
                                 "node (credentials minted per WHIP/WHEP answer)")
    turn.add_argument("--turn", action="store_true",
                      help="start coturn (UDP and TCP on --turn-port, TLS on --turn-tls-port)")
    turn.add_argument("--turn-port", type=int, default=3478, help="0 = any free port")
    turn.add_argument("--turn-tls-port", type=int, default=5349, help="0 = any free port")

    for name, names in SERVICE_FLAGS.items():
        p = sub.add_parser(name, help=f"run one {name} node",
                           description=f"Run one {name} node (HTTP + WebRTC).")
        _add_settings_flags(p, names)

    tok = sub.add_parser("token", help="mint a JWT for local use",
                         description="Print a signed JWT (HS256) for the given role.")
    tok.add_argument("role", choices=[r.value for r in Role])
    tok.add_argument("--user-id", default=None)
    tok.add_argument("--name", default=None, help="display name (bidders)")
    tok.add_argument("--ttl", type=float, default=12 * 3600, help="seconds until expiry")
    tok.add_argument("--jwt-secret", default=None,
                     help=f"(env {SECRET_ENV}; default: the secret `lotcast up` keeps in the data dir)")
    tok.add_argument("--data-dir", default=None,
                     help=f"the `up` data dir to read the secret from (env {DATA_DIR_ENV}; "
                     f"default {DEFAULT_DATA_DIR})")
    return parser


def _token_secret(args: argparse.Namespace) -> str:
    """--jwt-secret, else LOTCAST_JWT_SECRET, else the `up` secret file, else the services'
    built-in dev default (what a `lotcast relay` started without a secret uses)."""
    explicit = explicit_secret(args.jwt_secret)
    if explicit is not None:
        return explicit
    path = secret_path(data_dir(args.data_dir))
    stored = read_secret(path)
    if stored is not None:
        return stored
    print(f"lotcast token: no {SECRET_ENV} and no {path}: signing with the built-in dev secret",
          file=sys.stderr)
    return DEV_JWT_SECRET


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        secret = _token_secret(args)
        print(TokenAuthority(secret).mint(Role(args.role), args.user_id, args.name, args.ttl))
    elif args.command in ("broadcaster", "relay"):
        from lotcast.launch import run_node

        run_node(args.command, _settings_from(args, SERVICE_FLAGS[args.command]))
    elif args.command == "up":
        sys.exit(run_up(args))


def _log(message: str) -> None:
    print(f"[up] {message}", file=sys.stderr, flush=True)


def _dev_secret(data_dir: Path) -> tuple[str, str]:
    """The secret `up` hands its children, and how `up` describes where it came from."""
    explicit = explicit_secret()
    if explicit is not None:
        return explicit, f"from {SECRET_ENV} (not stored)"
    dev = load_or_create(data_dir)
    how = "created" if dev.source is SecretSource.CREATED else "reused"
    return dev.value, f"{dev.path} ({how}; mode 0600; {SECRET_ENV} overrides it)"


def _start_turn(args: argparse.Namespace, data: Path, cert: str, key: str,
                supervisor: Supervisor, env: dict[str, str]) -> CoturnServer | None:
    """`up --turn`: coturn on loopback (a new secret per run), advertised to the nodes via `env`;
    TURNS uses the HTTPS certificate when `up` serves one, else coturn's own self-signed one."""
    if not args.turn:
        return None
    from lotcast.turn import CoturnServer, free_udp_tcp_port

    coturn = CoturnServer(data_dir=data / "turn", port=args.turn_port or free_udp_tcp_port(),
                          tls_port=args.turn_tls_port or free_udp_tcp_port(),
                          cert=Path(cert) if cert else None, key=Path(key) if key else None,
                          supervised=True)
    supervisor.start(coturn)
    env |= {"LOTCAST_TURN_URLS": ",".join(coturn.urls), "LOTCAST_TURN_SECRET": coturn.secret}
    return coturn


def run_up(args: argparse.Namespace) -> int:
    from lotcast.redis_server import RedisServer
    from lotcast.supervisor import ServiceProcess, Supervisor

    data = data_dir(args.data_dir)
    try:
        secret, secret_note = _dev_secret(data)
    except (OSError, ValueError) as exc:
        _log(f"cannot read or create the JWT secret: {exc}")
        return 1
    try:
        exposure = plan_exposure(data, args.host, args.public_host, args.tls, args.cert, args.key,
                                 args.ca_file)
    except (OSError, ValueError) as exc:
        _log(f"cannot set up HTTPS: {exc}")
        return 1
    supervisor = Supervisor(_log)
    stop = threading.Event()

    def _stop(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    try:
        redis_url = args.redis_url or os.environ.get("LOTCAST_REDIS_URL")
        redis: RedisServer | None = None
        if not redis_url and args.redis_cluster:
            from lotcast.redis_cluster import start_supervised

            redis_url, cluster_note = start_supervised(args.redis_cluster, data, supervisor,
                                                       args.redis_cluster_port)
            print(cluster_note, flush=True)
        if not redis_url:
            redis = RedisServer(data_dir=data / "redis", supervised=True)
            supervisor.start(redis)
            redis_url = redis.url
        env = {"LOTCAST_JWT_SECRET": secret, "LOTCAST_REDIS_URL": redis_url, **exposure.env()}
        coturn = _start_turn(args, data, exposure.cert, exposure.key, supervisor, env)
        origins: list[ServiceProcess] = []
        for i in range(max(1, args.origins)):
            port = args.broadcaster_port + i if args.broadcaster_port else 0
            named = ["--node-id", f"origin-{i}"] if args.origins > 1 else []
            proc = ServiceProcess("broadcaster", ["--port", str(port), *named,
                                                  *exposure.url_args(port)],
                                  env=env, echo=True, supervised=True,
                                  name="broadcaster" if i == 0 else f"broadcaster-{i}")
            supervisor.start(proc)
            origins.append(proc)
        origin = origins[0]
        relays: list[ServiceProcess] = []
        relay_base = args.relay_port
        first, last = args.broadcaster_port, args.broadcaster_port + len(origins)
        if first and first <= relay_base < last:
            relay_base = last  # after the origins' ports
        for i in range(args.relays):
            port = relay_base + i if args.relay_port else 0
            relay = ServiceProcess("relay", ["--port", str(port), "--origin-url", origin.url,
                                             "--max-viewers", str(args.max_viewers),
                                             "--workers", str(args.workers),
                                             "--node-id", f"relay-{i}", *exposure.url_args(port)],
                                   env=env, echo=True, name=f"relay-{i}", supervised=True)
            supervisor.start(relay)
            relays.append(relay)
        viewer_base = relays[0].url if relays else origin.url
        authority = TokenAuthority(secret)
        host_token = authority.mint(Role.HOST, "host", "Host")
        bidder_token = authority.mint(Role.BIDDER, "demo-bidder", "Demo bidder")
        print()
        print("lotcast is up.")
        if redis is not None:
            print(f"  Redis:        {redis_url} (pid {redis.pid}; AOF in {redis.data_dir})")
        else:
            print(f"  Redis:        {redis_url} (not started by up)")
        if coturn is not None:
            print(f"  TURN:         {', '.join(coturn.urls)} (pid {coturn.pid}; "
                  f"secret in {coturn.data_dir / 'turnserver.conf'})")
        for proc in origins:
            print(f"  {proc.name + ':':<13} {proc.url} (pid {proc.pid})")
        for relay in relays:
            print(f"  {relay.name + ':':<13} {relay.url} (pid {relay.pid})")
        print(f"  Host page:    {origin.url}/host?stream={args.stream}#token={host_token}")
        print(f"  Viewer page:  {viewer_base}/watch?stream={args.stream}")
        print(f"  Bidder page:  {viewer_base}/watch?stream={args.stream}#token={bidder_token}")
        print(f"  Host token:   {host_token}")
        print(f"  JWT secret:   {secret_note}")
        print(f"  Mint more:    lotcast token bidder --name Alice --data-dir {data}")
        for note in exposure.notes:
            print(f"  HTTPS:        {note}")
        hint = phone_hint(exposure, origin.url)
        if hint:
            print(f"  On a phone:   {hint}")
        print("Press Ctrl-C to stop (a child that exits is restarted on the same port).", flush=True)
        supervisor.run(stop)
        return 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        _log(f"cannot start: {exc}")
        return 1
    finally:
        # A second Ctrl-C must not cut the orderly stop short (children run in their own session,
        # so the terminal's SIGINT reaches only us).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        supervisor.stop_all()
