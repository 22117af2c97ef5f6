"""Service configuration from flags and environment variables (LOTCAST_*)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

DEV_JWT_SECRET = "lotcast-dev-secret-change-me-0123456789"


@dataclass
class Settings:
    """Everything a broadcaster or relay process needs to know.

    Each field can be set with the environment variable ``LOTCAST_<FIELD>`` or the CLI flag
    ``--<field-with-dashes>``; flags win over the environment.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    # Public base URL of this node (what browsers and other nodes use to reach it).
    public_url: str = ""
    # The only IP address used for ICE host candidates (the node's reachable address).
    ice_ip: str = "127.0.0.1"
    # STUN/TURN URLs advertised in the WHIP/WHEP `Link: rel="ice-server"` header.
    ice_servers: list[str] = field(default_factory=list)
    # TURN servers (coturn with use-auth-secret) advertised with credentials minted per answer,
    # e.g. turn:turn.example.com:3478?transport=udp (lotcast/turn.py). The secret is coturn's
    # static-auth-secret; it never leaves this process. TTL: seconds a minted credential may be
    # used to create an allocation (coturn checks it then, not for the allocation's lifetime).
    turn_urls: list[str] = field(default_factory=list)
    turn_secret: str = ""
    turn_ttl: float = 12 * 3600.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    # --- Redis Cluster (lotcast/redisconn.py; docs/operations.md "Redis Cluster") ---
    # Treat redis_url as a cluster seed (also implied by a redis+cluster://h1:p1,h2:p2 URL).
    redis_cluster: bool = False
    # Durable acks: "wait" answers a bid/vote/host action only after WAIT 1 confirms a replica
    # has it (else the client gets `unavailable`), "off" once the primary has it, "auto" waits
    # when the Redis has replicas.
    redis_ack: str = "auto"
    redis_wait_timeout_ms: int = 1000
    jwt_secret: str = DEV_JWT_SECRET
    # Relay: where to pull streams from (origin or parent relay base URL).
    origin_url: str = "http://127.0.0.1:8080"
    # Relay: the most viewers this node accepts before answering 503.
    max_viewers: int = 500
    # Seconds a WHEP/WHIP session may go without RTCP from its peer before it is reaped.
    session_timeout: float = 15.0
    # Seconds the origin keeps a stream (and its viewers) after the publisher leaves.
    stream_grace: float = 60.0
    # Largest accepted SDP body, bytes.
    max_sdp_bytes: int = 64 * 1024
    # WHEP viewers need a token (any role) when true.
    private_streams: bool = False
    # Seconds a draining node waits after SIGTERM before exiting: a relay for its viewers to move
    # away, an origin for its publishers to republish elsewhere.
    drain_timeout: float = 30.0
    # Broadcaster: the most live streams this origin takes; WHIP placement sends the next ones to
    # another origin (or answers 503 when every origin is full).
    max_streams: int = 100
    node_id: str = ""
    # Relay: worker processes serving this node (lotcast/workers.py); 0 = one per usable CPU
    # (affinity and cgroup quota). max_viewers is the node's total, split between them.
    workers: int = 0
    # Serve every peer connection's ICE/DTLS/SRTP through one UDP port (a relay: one per worker,
    # worker i binds udp_port + i; a broadcaster: its publishers and the relays pulling from it)
    # on ice_ip, advertised as the host candidate; 0 = a socket per peer connection.
    udp_port: int = 0
    # With udp_port: the address the mux host candidates carry instead of ice_ip (which the mux
    # still binds), e.g. the node's IP when a k8s hostPort maps node:port to pod:port, as
    # mediasoup's announcedAddress; the port is unchanged. Empty = ice_ip.
    ice_announce_ip: str = ""
    log_level: str = "info"
    # --- TLS (lotcast/tls.py) ---
    # PEM certificate (chain) and key: the node serves HTTPS/WSS only (flags --cert/--key too).
    # Renewed files are loaded without dropping connections, checked every tls_reload_interval s.
    tls_cert: str = ""
    tls_key: str = ""
    tls_reload_interval: float = 5.0
    # PEM CA bundle trusted for this node's own HTTPS requests (WHEP pulls from the origin or a
    # parent relay); empty = the system store.
    ca_file: str = ""
    # --- Interactive layer (lotcast/interactive) ---
    # Per user per room token buckets, enforced in Redis across nodes (rate <= 0 disables).
    bid_rate: float = 5.0
    bid_burst: int = 10
    vote_rate: float = 2.0
    vote_burst: int = 4
    chat_rate: float = 2.0
    chat_burst: int = 5
    upvote_rate: float = 5.0
    upvote_burst: int = 10
    reaction_rate: float = 5.0
    reaction_burst: int = 10
    # Per connection: any client messages beyond this are refused; sustained floods close 4029.
    ws_msg_rate: float = 30.0
    ws_msg_burst: int = 60
    # Bytes queued for one socket before it is disconnected as a slow consumer (close 4008).
    ws_outbox_bytes: int = 1024 * 1024
    # Room log batches to watchers are sent at most once per this interval.
    ws_flush_interval_ms: int = 100
    # Poll tallies are sent at most once per this interval per poll.
    tally_interval_ms: int = 200
    # Seconds a new socket may take to send `hello`.
    hello_timeout: float = 10.0
    # Room log length kept in Redis for resume (older gaps get a snapshot).
    room_history: int = 10000
    # How often each node runs the settle pass (ends lots/polls whose time is up).
    settle_interval_ms: int = 200
    # --- Scale-out (relay registry, placement, cascade) ---
    # Seconds between registry heartbeats; an entry expires after 3 intervals without one.
    heartbeat_interval: float = 1.0
    # Placement skips relays at or above this CPU load (fraction of one core).
    placement_cpu_limit: float = 0.9
    # Deepest cascade level (0 = every relay pulls from the origin).
    max_cascade_depth: int = 2
    # Relays that may pull a stream straight from the origin before new ones cascade from a relay
    # (0 = no limit: cascade only when every relay carrying the stream is full).
    origin_fanout: int = 0

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        settings = cls()
        for f in fields(cls):
            raw = os.environ.get(f"LOTCAST_{f.name.upper()}")
            if raw is not None:
                setattr(settings, f.name, _coerce(f.type, raw))
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        if not settings.public_url:
            scheme = "https" if settings.tls_cert else "http"
            settings.public_url = f"{scheme}://{settings.host}:{settings.port}"
        return settings


def _coerce(type_name: Any, raw: str) -> Any:
    t = str(type_name)
    if t == "int":
        return int(raw)
    if t == "float":
        return float(raw)
    if t == "bool":
        return raw.lower() in ("1", "true", "yes", "on")
    if t.startswith("list"):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw
