"""A file's bytes and lines, streaming through decompression (gzip, zstd, bz2, xz).

A damaged or truncated archive raises :class:`Damage` at the point it goes bad; what was read
before it stands. Standard library (and `zstandard` for .zst files).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path

from lmforge.ingest.problems import IngestError, OnBytes, ignore

CHUNK = 1 << 20  # bytes read at a time


class Damage(Exception):
    """A compressed file that ends early or does not decompress; what was read before it stands."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.line: int | None = None


def zstd_chunks(fh, zstandard, on_bytes: OnBytes) -> Iterator[bytes]:
    # Frame by frame with decompressobj: `stream_reader` ends quietly at a truncated frame.
    dctx = zstandard.ZstdDecompressor()
    try:
        obj, in_frame = dctx.decompressobj(), False
        while data := fh.read(CHUNK):
            on_bytes(len(data))
            while data:
                out = obj.decompress(data)
                in_frame = True
                if out:
                    yield out
                if obj.eof:  # frame complete: the rest (if any) starts the next frame
                    data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
                else:
                    data = b""
    except zstandard.ZstdError as err:
        raise Damage("corrupt_archive", f"damaged zstd archive ({err})") from None
    if in_frame:
        raise Damage("truncated_archive", "truncated zstd archive: the file ends inside a frame")


def chunks(path: Path, compression: str | None, on_bytes: OnBytes = ignore) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks; `Damage` where a compressed file goes bad.

    `on_bytes` is told the bytes read from the file itself (compressed bytes, when compressed).
    """
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise IngestError(
                f"{path}: reading .zst files needs the `zstandard` package (pip install zstandard)"
            ) from None
        with path.open("rb") as fh:
            yield from zstd_chunks(fh, zstandard, on_bytes)
        return
    try:
        with path.open("rb") as raw, decompressing(raw, compression) as fh:
            done = 0
            # read1: one underlying read at a time, so what was decoded before damage is not lost.
            while chunk := fh.read1(CHUNK):
                position = raw.tell()
                on_bytes(position - done)
                done = position
                yield chunk
    except EOFError as err:
        raise Damage("truncated_archive", f"truncated {compression} archive ({err})") from None
    except (OSError, zlib.error, lzma.LZMAError) as err:
        if compression is None:
            raise
        raise Damage("corrupt_archive", f"damaged {compression} archive ({err})") from None


def decompressing(raw, compression: str | None):
    """A reader of `raw`'s decompressed bytes (the caller's `with` closes it); `raw` itself if plain."""
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(raw, "rb")
    if compression == "xz":
        return lzma.LZMAFile(raw, "rb")  # noqa: SIM115
    return raw


def raw_lines(path: Path, compression: str | None, on_bytes: OnBytes = ignore) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes with their b"\\n") per line; a damaged archive loses its cut line."""
    number, pending = 0, []
    try:
        for chunk in chunks(path, compression, on_bytes):
            parts = chunk.split(b"\n")
            if len(parts) == 1:
                pending.append(chunk)
                continue
            if pending:
                parts[0] = b"".join([*pending, parts[0]])
                pending = []
            tail = parts.pop()
            for part in parts:
                number += 1
                yield number, part + b"\n"
            if tail:
                pending.append(tail)
    except Damage as damage:
        damage.line = number + 1
        raise
    if pending:
        yield number + 1, b"".join(pending)
