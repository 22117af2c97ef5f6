"""Live auction, polls and room events over WebSockets through Redis (docs/protocol.md).

Layers, importing downward only: protocol (wire schema, sans-IO) -> functions/store/polls/roomlog
(Redis, one atomic Function per change) -> hub/outbox (per-node fan-out) -> session (one socket)
-> service (what a node mounts). Nothing here imports the media path.
"""
