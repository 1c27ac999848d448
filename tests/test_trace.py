"""The trace file format (writer, reader) and `moe2 record` against a real nats-server."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe2.agents.traces.recorder import Recorder, record
from moe2.runtime.connection import nats_connection
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.trace import (
    TRACE_TYPE,
    TraceRecord,
    TraceWriter,
    load_trace,
    new_header,
    object_end,
    read_trace,
)

ALL_BYTES = bytes(range(256))


def write(path: Path, records: list[TraceRecord], flush_s: float = 0.2) -> None:
    with TraceWriter(path, new_header(server="nats://x:1", subjects=[">"]), flush_s=flush_s) as w:
        for r in records:
            w.write(r)


def sample_records() -> list[TraceRecord]:
    headers = {"K": "v", "X-Id": "7"}
    return [
        TraceRecord(0.0, "a.b", data=b"plain"),
        TraceRecord(0.5, "a.c", reply="_INBOX.xyz", headers=headers, data=ALL_BYTES),
        TraceRecord(1.25, "big", data=ALL_BYTES * 6000),  # 1.5 MiB: crosses the reader's chunks
        TraceRecord(2.0, "empty", data=b""),
    ]


def test_round_trip_keeps_header_records_and_order(tmp_path: Path) -> None:
    path = tmp_path / "t.moe2"
    write(path, sample_records())
    header, records = load_trace(path)
    assert header.type == TRACE_TYPE and header.version == 1
    assert header.server == "nats://x:1" and header.subjects == [">"] and header.host
    assert header.created.endswith("Z")
    assert records == sample_records()


def test_header_is_a_plain_msgpack_map(tmp_path: Path) -> None:
    """What a reader in another language sees first: a map with the documented keys."""
    path = tmp_path / "t.moe2"
    write(path, sample_records()[:1])
    data = path.read_bytes()
    end = object_end(data, 0)
    header = msgspec.msgpack.decode(data[:end])
    assert set(header) == {"type", "version", "created", "server", "subjects", "host"}
    record = msgspec.msgpack.decode(data[end:])
    assert record == {"t": 0.0, "subject": "a.b", "reply": None, "headers": None, "data": b"plain"}


def test_truncated_last_record_is_dropped_quietly(tmp_path: Path) -> None:
    path = tmp_path / "t.moe2"
    records = [TraceRecord(i / 10, f"s.{i}", data=ALL_BYTES) for i in range(50)]
    write(path, records)
    for cut in (1, 7, 200):
        path.write_bytes(path.read_bytes()[:-cut])
        _, got = load_trace(path)
        assert got == records[: len(got)] and len(got) >= 45
    _, got = load_trace(path)
    assert len(got) < len(records)


def test_writer_flushes_without_close(tmp_path: Path) -> None:
    """A recorder killed now has already put what it wrote on the disk."""
    path = tmp_path / "t.moe2"
    writer = TraceWriter(path, new_header(server="", subjects=[">"]), flush_s=0.0)
    writer.write(TraceRecord(0.1, "x", data=b"1"))
    _, got = load_trace(path)
    assert got == [TraceRecord(0.1, "x", data=b"1")]
    writer.close()
    writer.close()  # idempotent


def pack(value: object) -> bytes:
    return msgspec.msgpack.encode(value)


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", ErrorCode.MALFORMED),
        (b"hello, I am a text file\n", ErrorCode.MALFORMED),
        (pack([1, 2, 3]), ErrorCode.MALFORMED),
        (pack({"type": "moe2.v1.slice", "version": 1}), ErrorCode.MALFORMED),
        (pack({"type": TRACE_TYPE, "version": 2}), ErrorCode.UNSUPPORTED_VERSION),
        (pack({"type": TRACE_TYPE, "version": 1}), ErrorCode.MALFORMED),  # fields missing
        (pack({"type": TRACE_TYPE, "version": 1, "x": "y" * 99})[:-5], ErrorCode.MALFORMED),
    ],
)
def test_non_trace_is_refused_with_a_code(tmp_path: Path, content: bytes, code: ErrorCode) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(Moe2Error) as err:
        read_trace(path)
    assert err.value.code == code


def test_corrupt_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.moe2"
    write(path, sample_records()[:1])
    path.write_bytes(path.read_bytes() + msgspec.msgpack.encode({"t": "not a time"}) + b"\x81")
    with pytest.raises(Moe2Error) as err:
        load_trace(path)
    assert err.value.code == ErrorCode.MALFORMED


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(max_size=70_000)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(), inner, max_size=20),
    max_leaves=40,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_values, min_size=1, max_size=5))
def test_object_end_finds_every_msgpack_boundary(values: list[object]) -> None:
    parts = [msgspec.msgpack.encode(v) for v in values]
    data, pos = b"".join(parts), 0
    for part in parts:
        end = object_end(data, pos)
        assert data[pos:end] == part
        pos = end


# --- recording a live bus ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_record_live_traffic_in_order(nats_url: str, tmp_path: Path) -> None:
    out = tmp_path / "live.moe2"
    recorder = Recorder(nats_url, out)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, nats_connection(nats_url, name="t") as nc:
            await tg.start(recorder.run)
            await nc.publish("demo.one", b"1")
            await nc.publish("demo.two", ALL_BYTES, headers={"Trace-Id": "abc"})
            await nc.publish("demo.three", b"3", reply="_INBOX.me")
            await nc.publish("_INBOX.client.1", b"answer")
            await nc.flush()
            recorder.stop()
    header, records = load_trace(out)
    assert header.server == nats_url and header.subjects == [">"]
    assert [r.subject for r in records] == ["demo.one", "demo.two", "demo.three", "_INBOX.client.1"]
    assert records[1].data == ALL_BYTES and records[1].headers == {"Trace-Id": "abc"}
    assert records[2].reply == "_INBOX.me" and records[0].reply is None
    times = [r.t for r in records]
    assert times == sorted(times) and times[0] >= 0
    assert recorder.count == 4


@pytest.mark.anyio
async def test_record_only_the_subjects_asked_and_stops_on_event(
    nats_url: str, tmp_path: Path
) -> None:
    out, stop = tmp_path / "some.moe2", anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, nats_connection(nats_url, name="t") as nc:
            await tg.start(partial(record, nats_url, out, subjects=["keep.*"], stop=stop))
            for subject in ("keep.a", "drop.a", "keep.b", "keep.b.deeper"):
                await nc.publish(subject, b"x")
            await nc.flush()
            stop.set()
    _, records = load_trace(out)
    assert [r.subject for r in records] == ["keep.a", "keep.b"]


@pytest.mark.anyio
async def test_record_flushes_to_disk_while_running(nats_url: str, tmp_path: Path) -> None:
    out = tmp_path / "running.moe2"
    recorder = Recorder(nats_url, out, flush_s=0.3)  # longer than the set-up: no write flushes
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, nats_connection(nats_url, name="t") as nc:
            await tg.start(recorder.run)
            await nc.publish("quiet.bus", b"last words")
            await nc.flush()
            # No event says when bytes reach the disk: poll it, as a reader after a crash would.
            while not [r for r in load_trace(out)[1] if r.subject == "quiet.bus"]:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            recorder.stop()


@pytest.mark.anyio
async def test_record_stops_after_duration(nats_url: str, tmp_path: Path) -> None:
    with anyio.fail_after(5):
        started = anyio.current_time()
        count = await record(nats_url, tmp_path / "d.moe2", duration=0.2)
    assert count == 0 and 0.15 < anyio.current_time() - started < 3


@pytest.mark.anyio
async def test_record_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with anyio.fail_after(10), pytest.raises(Moe2Error) as err:
        await record("nats://127.0.0.1:1", tmp_path / "x.moe2", duration=1)
    assert err.value.code == ErrorCode.UNREACHABLE
