from collections.abc import Sequence
from typing import Any

FAIL_OS: int
FAIL_SRTP: int
FAIL_SIZE: int
MAX_TRAILER: int

class SinkSet:
    def __init__(self, protect: int,
                 sinks: Sequence[tuple[int, int, str, int, int, int]
                                 | tuple[int, int, str, int, int, int, int, int]],
                 payload_type: int = -1, keep: Any = None) -> None: ...
    def send(self, packet: bytes) -> tuple[int, tuple[tuple[int, int, int], ...]] | None: ...
    def size(self) -> int: ...
    def syscalls(self) -> tuple[int, int]: ...
    def __len__(self) -> int: ...

def protect_send_loop(protect: int, srtp: int, fd: int, host: str, port: int,
                      packets: list[bytes], rounds: int, first_seq: int = 0) -> int: ...
