"""Messages of a ``multiprocessing.Connection`` read from a non-blocking descriptor, so that an
event loop can take them as bytes arrive (:mod:`lmforge.serving.process` reads the engine's events
on the web server's loop this way). Standard library only.
"""

from __future__ import annotations

import os
import struct


class Frames:
    """``multiprocessing.Connection`` messages read from a non-blocking descriptor.

    A message is a 4-byte big-endian signed length (``-1`` then an 8-byte length past 2 GiB) and
    that many bytes of pickle (CPython's ``Connection._send_bytes``). ``read`` takes what the pipe
    holds now and returns the complete messages, keeping a partial one for the next call."""

    CHUNK = 1 << 20

    @staticmethod
    def encode(payload: bytes) -> bytes:
        """``payload`` framed as ``Connection.send_bytes`` writes it (what ``read`` takes apart)."""
        if len(payload) < 0x7FFFFFFF:
            return struct.pack("!i", len(payload)) + payload
        return struct.pack("!iQ", -1, len(payload)) + payload

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, bytearray()

    def read(self) -> tuple[list[bytes], bool]:
        """(complete payloads, whether the writer closed the pipe)."""
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, self.CHUNK)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not chunk:
                eof = True
                break
            self.buffer += chunk
        return self._split(), eof

    def _split(self) -> list[bytes]:
        out, buf, at = [], self.buffer, 0
        while len(buf) - at >= 4:
            (size,) = struct.unpack_from("!i", buf, at)
            head = 4
            if size == -1:
                if len(buf) - at < 12:
                    break
                (size,) = struct.unpack_from("!Q", buf, at + 4)
                head = 12
            if len(buf) - at < head + size:
                break
            out.append(bytes(buf[at + head : at + head + size]))
            at += head + size
        del buf[:at]
        return out
