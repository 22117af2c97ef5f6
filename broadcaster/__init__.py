"""The origin: WHIP ingest from the host, WHEP egress to relays, host console API."""
