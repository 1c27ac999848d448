"""The trace file: a header and the captured NATS messages, as concatenated msgpack maps.

Pure file I/O, no NATS. docs/trace-format.md is the reference for readers in other languages.
The writer flushes at least every ``flush_s`` seconds of writes, so a killed recorder loses at
most the last fraction of a second; the reader stops quietly at a truncated last record.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final

import msgspec
import structlog

from moe2.runtime.errors import ErrorCode, Moe2Error

TRACE_TYPE: Final = "moe2.v1.trace"
TRACE_VERSION: Final = 1
_CHUNK: Final = 1 << 20

log = structlog.get_logger("moe2.trace")


class TraceHeader(msgspec.Struct, frozen=True, kw_only=True):
    """The first map of a trace file."""

    type: str = TRACE_TYPE
    version: int = TRACE_VERSION
    created: str  # ISO-8601 UTC, when the recording started
    server: str  # the NATS URL recorded from ("" for a synthetic trace)
    subjects: list[str]  # the subscriptions recorded
    host: str


class TraceRecord(msgspec.Struct, frozen=True):
    """One captured message; ``t`` is seconds since the recording started (monotonic clock)."""

    t: float
    subject: str
    reply: str | None = None
    headers: dict[str, str] | None = None
    data: bytes = b""


def new_header(*, server: str, subjects: Sequence[str]) -> TraceHeader:
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return TraceHeader(
        created=created.replace("+00:00", "Z"),
        server=server,
        subjects=list(subjects),
        host=socket.gethostname(),
    )


class TraceWriter:
    """``with TraceWriter(path, header) as w: w.write(rec)``; flushes every ``flush_s``."""

    def __init__(self, path: Path, header: TraceHeader, *, flush_s: float = 0.2) -> None:
        self.path = path
        self.count = 0
        self._flush_s = flush_s
        self._encoder = msgspec.msgpack.Encoder()
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115  # closed by close()/__exit__
        self._file.write(self._encoder.encode(header))
        self._file.flush()
        self._flushed = time.monotonic()

    def write(self, record: TraceRecord) -> None:
        self._file.write(self._encoder.encode(record))
        self.count += 1
        if time.monotonic() - self._flushed >= self._flush_s:
            self.flush()

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        """Idempotent."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TruncatedObject(Exception):
    """The buffer ends inside a msgpack object."""


def read_trace(path: Path) -> tuple[TraceHeader, Iterator[TraceRecord]]:
    """The header (checked now) and a lazy iterator of the records, in file order."""
    with open(path, "rb") as f:
        head = f.read(_CHUNK)
    end = _header_end(head)
    header = _parse_header(head[:end])
    return header, _records(path, end)


def _header_end(buf: bytes) -> int:
    if not buf or (buf[0] & 0xF0 != 0x80 and buf[0] not in (0xDE, 0xDF)):
        raise Moe2Error(ErrorCode.MALFORMED, "not a moe2 trace: the file does not start with a map")
    try:
        return object_end(buf, 0)
    except (TruncatedObject, ValueError):
        raise Moe2Error(ErrorCode.MALFORMED, "not a moe2 trace: unreadable header") from None


def _parse_header(data: bytes) -> TraceHeader:
    raw = msgspec.msgpack.decode(data)
    if not isinstance(raw, dict) or raw.get("type") != TRACE_TYPE:
        raise Moe2Error(ErrorCode.MALFORMED, f"not a moe2 trace: header type is not {TRACE_TYPE!r}")
    if raw.get("version") != TRACE_VERSION:
        raise Moe2Error(
            ErrorCode.UNSUPPORTED_VERSION,
            f"trace format version {raw.get('version')!r}; this reader knows {TRACE_VERSION}",
        )
    try:
        return msgspec.convert(raw, TraceHeader)
    except msgspec.ValidationError as exc:
        raise Moe2Error(ErrorCode.MALFORMED, f"bad trace header: {exc}") from None


def _records(path: Path, start: int) -> Iterator[TraceRecord]:
    decoder = msgspec.msgpack.Decoder(TraceRecord)
    with open(path, "rb") as f:
        f.seek(start)
        buf, pos = b"", 0
        while chunk := f.read(_CHUNK):
            buf = buf[pos:] + chunk
            pos = yield from _complete_records(buf, decoder)
        if pos < len(buf):
            log.warning("trace_truncated", path=str(path), lost_bytes=len(buf) - pos)


def _complete_records(
    buf: bytes, decoder: msgspec.msgpack.Decoder[TraceRecord]
) -> Generator[TraceRecord, None, int]:
    """Yield every whole record in ``buf``; return the offset where the incomplete rest starts."""
    pos = 0
    while pos < len(buf):
        try:
            end = object_end(buf, pos)
        except TruncatedObject:
            break
        except ValueError as exc:
            raise Moe2Error(ErrorCode.MALFORMED, f"bad trace record at +{pos}: {exc}") from None
        yield _decode_record(decoder, buf[pos:end], pos)
        pos = end
    return pos


def _decode_record(
    decoder: msgspec.msgpack.Decoder[TraceRecord], data: bytes, at: int
) -> TraceRecord:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise Moe2Error(ErrorCode.MALFORMED, f"bad trace record at +{at}: {exc}") from None


# fmt: off
# msgpack lead byte -> (length-field bytes, fixed payload bytes, child objects per unit of length)
_SIZED: Final[dict[int, tuple[int, int, int]]] = {
    0xC4: (1, 0, -1), 0xC5: (2, 0, -1), 0xC6: (4, 0, -1),  # bin 8/16/32
    0xD9: (1, 0, -1), 0xDA: (2, 0, -1), 0xDB: (4, 0, -1),  # str 8/16/32
    0xC7: (1, 1, -1), 0xC8: (2, 1, -1), 0xC9: (4, 1, -1),  # ext 8/16/32
    0xDC: (2, 0, 1), 0xDD: (4, 0, 1), 0xDE: (2, 0, 2), 0xDF: (4, 0, 2),  # array, map 16/32
}
_FIXED: Final[dict[int, int]] = {
    0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2,
    0xD2: 4, 0xD3: 8, 0xCA: 4, 0xCB: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}
# fmt: on


def object_end(buf: bytes, pos: int) -> int:
    """The offset just past the msgpack object at ``pos``; TruncatedObject if it runs off."""
    pending = 1
    while pending:
        if pos >= len(buf):
            raise TruncatedObject
        pos, children = _skip_head(buf, pos)
        pending += children - 1
    if pos > len(buf):
        raise TruncatedObject
    return pos


def _skip_head(buf: bytes, pos: int) -> tuple[int, int]:
    """Skip one object's head (and any raw payload); return the new offset and its child count."""
    lead = buf[pos]
    if lead <= 0x7F or lead >= 0xE0:
        return pos + 1, 0
    if lead & 0xE0 == 0xA0:  # fixstr
        return pos + 1 + (lead & 0x1F), 0
    if lead & 0xF0 in (0x80, 0x90):  # fixmap, fixarray
        return pos + 1, (lead & 0x0F) * (2 if lead < 0x90 else 1)
    if lead in _FIXED:
        return pos + 1 + _FIXED[lead], 0
    if lead not in _SIZED:
        raise ValueError(f"invalid msgpack byte 0x{lead:02x}")
    width, extra, per = _SIZED[lead]
    if pos + 1 + width > len(buf):
        raise TruncatedObject
    n = int.from_bytes(buf[pos + 1 : pos + 1 + width], "big")
    head = pos + 1 + width
    return (head + extra + n, 0) if per < 0 else (head, n * per)


def load_trace(path: Path) -> tuple[TraceHeader, list[TraceRecord]]:
    """The header and all records, read at once."""
    header, records = read_trace(path)
    return header, list(records)
