"""The STUN Binding success response a relay sends for each ICE check, built in one pass.

Every viewer keeps checking consent on its selected pair (RFC 7675: aiortc every ~5 s, browsers
every ~2.5 s), so answering checks is a fixed cost per viewer. aioice builds each answer through
its generic `Message` (attribute dict, XOR-MAPPED-ADDRESS XORed byte by byte, the message
serialised three times for MESSAGE-INTEGRITY and FINGERPRINT). `binding_success` produces the same
bytes (tests/test_lean_rtcp.py compares them) with two struct packs, one HMAC-SHA1 and one CRC32.

Pure: no I/O. RFC 8489 (STUN), RFC 8445 (ICE).
"""

from __future__ import annotations

import binascii
import hmac
import ipaddress
import struct

COOKIE = 0x2112A442
BINDING_SUCCESS = 0x0101
XOR_MAPPED_ADDRESS = 0x0020
MESSAGE_INTEGRITY = 0x0008
FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E
_HEADER = struct.Struct("!HHI12s")
_COOKIE_BYTES = struct.pack("!I", COOKIE)


def _xor_address(addr: tuple[str, int], transaction_id: bytes) -> bytes:
    host, port = addr[0], int(addr[1])
    packed = ipaddress.ip_address(host.split("%", 1)[0]).packed
    pad = _COOKIE_BYTES + transaction_id
    xored = bytes(b ^ p for b, p in zip(packed, pad, strict=False))
    family = 1 if len(packed) == 4 else 2
    return struct.pack("!BBH", 0, family, port ^ (COOKIE >> 16)) + xored


def binding_success(transaction_id: bytes, addr: tuple[str, int], password: bytes) -> bytes:
    """The Binding success response to the request ``transaction_id`` from ``addr``:
    XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY (keyed with our ICE password), FINGERPRINT."""
    value = _xor_address(addr, transaction_id)
    attrs = struct.pack("!HH", XOR_MAPPED_ADDRESS, len(value)) + value
    return _signed(BINDING_SUCCESS, transaction_id, attrs, password)


def _signed(message_type: int, transaction_id: bytes, attrs: bytes, password: bytes) -> bytes:
    """The message with ``attrs``, then MESSAGE-INTEGRITY (keyed with ``password``) and
    FINGERPRINT, as aioice's ``add_message_integrity`` builds them."""
    # the integrity covers the header with a length that counts MESSAGE-INTEGRITY itself
    head = _HEADER.pack(message_type, len(attrs) + 24, COOKIE, transaction_id)
    digest = hmac.new(password, head + attrs, "sha1").digest()
    integrity = struct.pack("!HH", MESSAGE_INTEGRITY, 20) + digest
    # the fingerprint covers everything before it, with a length that counts it too
    head = _HEADER.pack(message_type, len(attrs) + 24 + 8, COOKIE, transaction_id)
    crc = binascii.crc32(head + attrs + integrity) ^ FINGERPRINT_XOR
    return head + attrs + integrity + struct.pack("!HHI", FINGERPRINT, 4, crc)


BINDING_REQUEST = 0x0001
USERNAME = 0x0006
PRIORITY = 0x0024
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A


def binding_request(transaction_id: bytes, username: str, priority: int, controlling: bool,
                    tie_breaker: int, password: bytes) -> bytes:
    """An ICE consent check (RFC 7675): the Binding request aioice's ``build_request`` +
    ``add_message_integrity`` send on the nominated pair, USERNAME ``remote:local``, PRIORITY,
    ICE-CONTROLLING or ICE-CONTROLLED with the tie-breaker, MESSAGE-INTEGRITY keyed with the
    peer's password, FINGERPRINT."""
    name = username.encode("utf8")
    pad = bytes(-len(name) % 4)
    attrs = (struct.pack("!HH", USERNAME, len(name)) + name + pad
             + struct.pack("!HHI", PRIORITY, 4, priority)
             + struct.pack("!HHQ", ICE_CONTROLLING if controlling else ICE_CONTROLLED, 8,
                           tie_breaker))
    return _signed(BINDING_REQUEST, transaction_id, attrs, password)
