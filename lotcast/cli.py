"""`lotcast` command line: up, broadcaster, relay, token."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from lotcast.auth import Role, TokenAuthority
from lotcast.config import Settings

# Every Settings field is a flag on both services; these only mean something on a relay.
RELAY_ONLY = {"origin_url", "max_viewers", "drain_timeout", "origin_fanout"}
SERVICE_FLAGS = {
    "broadcaster": [f.name for f in fields(Settings) if f.name not in RELAY_ONLY],
    "relay": [f.name for f in fields(Settings)],
}


def _add_settings_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    defaults = Settings()
    for f in fields(Settings):
        if f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        env = f"LOTCAST_{f.name.upper()}"
        default = getattr(defaults, f.name)
        help_text = f"(env {env}; default {default!r})"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        elif f.type.startswith("list"):
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
        else:
            kind: Any = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


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
                    help="first relay port; relay i listens on relay-port + i (0 = any free port)")
    up.add_argument("--relays", type=int, default=1)
    up.add_argument("--stream", default="main", help="stream id used in the printed URLs")
    up.add_argument("--data-dir", default=".lotcast", help="where Redis keeps its AOF")
    up.add_argument("--redis-url", default=None,
                    help="use this Redis instead of starting one (env LOTCAST_REDIS_URL)")
    up.add_argument("--max-viewers", type=int, default=500)

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
    tok.add_argument("--jwt-secret", default=None, help="(env LOTCAST_JWT_SECRET)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        secret = args.jwt_secret or Settings.from_env().jwt_secret
        print(TokenAuthority(secret).mint(Role(args.role), args.user_id, args.name, args.ttl))
    elif args.command in ("broadcaster", "relay"):
        from lotcast.service import run_service

        run_service(args.command, _settings_from(args, SERVICE_FLAGS[args.command]))
    elif args.command == "up":
        sys.exit(run_up(args))


def run_up(args: argparse.Namespace) -> int:
    from lotcast.redis_server import RedisServer
    from lotcast.supervisor import ServiceProcess

    secret = os.environ.get("LOTCAST_JWT_SECRET") or secrets.token_urlsafe(32)
    redis: RedisServer | None = None
    redis_url = args.redis_url or os.environ.get("LOTCAST_REDIS_URL")
    if not redis_url:
        redis = RedisServer(data_dir=Path(args.data_dir).resolve() / "redis")
        redis.start()
        redis_url = redis.url
    env = {"LOTCAST_JWT_SECRET": secret, "LOTCAST_REDIS_URL": redis_url}
    procs: list[ServiceProcess] = []
    try:
        origin = ServiceProcess("broadcaster", ["--port", str(args.broadcaster_port)],
                                env=env, echo=True).start()
        procs.append(origin)
        for i in range(args.relays):
            port = args.relay_port + i if args.relay_port else 0
            relay = ServiceProcess("relay", ["--port", str(port), "--origin-url", origin.url,
                                             "--max-viewers", str(args.max_viewers),
                                             "--node-id", f"relay-{i}"],
                                   env=env, echo=True).start()
            procs.append(relay)
        authority = TokenAuthority(secret)
        host_token = authority.mint(Role.HOST, "host", "Host")
        bidder_token = authority.mint(Role.BIDDER, "demo-bidder", "Demo bidder")
        print()
        print("lotcast is up.")
        print(f"  Redis:        {redis_url}")
        print(f"  Host page:    {origin.url}/host?stream={args.stream}#token={host_token}")
        print(f"  Viewer page:  {procs[1].url if len(procs) > 1 else origin.url}"
              f"/watch?stream={args.stream}")
        print(f"  Bidder page:  {procs[1].url if len(procs) > 1 else origin.url}"
              f"/watch?stream={args.stream}#token={bidder_token}")
        print(f"  Host token:   {host_token}")
        print("  Mint more:    LOTCAST_JWT_SECRET=<secret> lotcast token bidder --name Alice")
        print(f"  JWT secret:   {secret}")
        print("Press Ctrl-C to stop.", flush=True)
        stop = threading.Event()

        def _stop(*_: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        try:
            while not stop.is_set():
                for p in procs:
                    if not p.alive():
                        print(f"{p.command} exited; shutting down", file=sys.stderr)
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        if redis is not None:
            redis.close()
