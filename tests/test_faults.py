"""Issue 12 part 2, "Faults": experts and fusion agents killed (SIGKILL) or stopped (SIGSTOP) as
real processes on a real nats-server, and what the client sees (docs/faults.md).

Experts are scripted expert processes (tests/live_expert.py: each step answers one byte of
"Hello from the bus." after a delay), or real `moe2 expert` processes serving SmolLM2 for the
overload test; fusion agents are `moe2 fusion` processes.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

import moe2
from moe2.runtime import wire
from moe2.runtime.decoding import (
    Arrived,
    DecodeSettings,
    Decoding,
    Gone,
    Probe,
    Tick,
    ToClient,
    ToExpert,
)
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.server import NatsServer
from moe2.runtime.subjects import Subjects
from tests.test_decoding import SETTINGS, plan, slice_of

# real processes killed and stopped, about 2 min together: run by .ci/run after make test
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Hello from the bus."  # what every scripted expert answers (tests/scripted.py)
DEADLINE_S = 1.0  # the step deadline the questions ask for
_names = itertools.count()


@dataclass
class Procs:
    """Agent processes of one test, each logging to its own file; all gone after the test."""

    url: str
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _start(self, name: str, command: list[str]) -> None:
        with (self.logs / f"{name}.log").open("ab") as out:
            self.procs[name] = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )

    def expert(self, name: str, heartbeat_s: float = 0.2, delay_s: float = 0.05) -> None:
        """A scripted expert process (tests/live_expert.py)."""
        args = [self.url, name, str(heartbeat_s), str(delay_s)]
        self._start(name, [sys.executable, "-m", "tests.live_expert", *args])

    def moe2(self, name: str, *args: str) -> None:
        self._start(name, [sys.executable, "-m", "moe2", *args, "--nats", self.url])

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_logged(self, name: str, event: str, times: int = 1, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while self.log(name).count(f"] {event} ") < times:
            assert self.procs[name].poll() is None, f"{name} exited:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name}: no {event}:\n{self.log(name)[-3000:]}"
            time.sleep(0.05)

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.procs[name].pid, sig)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a stopped one takes no SIGTERM before this
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def procs(nats_server: NatsServer, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(nats_server.url, tmp_path)
    try:
        yield p
    finally:
        p.stop()


def names(prefix: str, n: int) -> list[str]:
    """Expert ids no earlier test of the module used (the bus and its fusion agents are shared)."""
    k = next(_names)
    return [f"{prefix}{k}x{i}" for i in range(n)]


def scripted_bus(
    procs: Procs, n: int, *, heartbeat_s: float = 0.2, delay_s: float = 0.05, fusions: int = 1
) -> list[str]:
    """``n`` scripted expert processes and ``fusions`` fusion agents that have seen them join."""
    experts = names("f", n)
    for e in experts:
        procs.expert(e, heartbeat_s, delay_s)
    for i in range(fusions):
        procs.moe2(f"fusion{i}", "fusion")
    for i in range(fusions):
        procs.wait_logged(f"fusion{i}", "fusion_ready")
        procs.wait_logged(f"fusion{i}", "expert_joined", n)
    return experts


async def timed_answer(url: str, **ask: object) -> tuple[wire.Final, float]:
    async with moe2.connect(url, name="faults-client") as client:
        started = time.monotonic()
        final = await client.ask(TEXT, step_deadline_s=DEADLINE_S, **ask).collect()  # type: ignore[arg-type]
        return final, time.monotonic() - started


# --- the decode loop's part, without a bus -------------------------------------------------------


def test_a_gone_expert_leaves_at_once_and_the_step_ends_with_the_others() -> None:
    machine = Decoding(plan(["a", "b"]), SETTINGS, started=0.0)
    machine.start(0.0)
    machine.apply(Arrived("a", slice_of("a", 0, b"hi")), 0.1)
    out = machine.apply(Gone("b", "no responders"), 0.2)  # long before the step's deadline
    steps = [a for a in out if isinstance(a, ToExpert) and isinstance(a.message, wire.Step)]
    closes = [
        a.expert for a in out if isinstance(a, ToExpert) and isinstance(a.message, wire.Close)
    ]
    assert closes == ["b"] and [a.expert for a in steps] == ["a"]
    assert machine.step == 1 and machine.dropped == ["b"] and machine.active == ["a"]


def test_a_step_without_slices_waits_longer_while_probed_then_fails() -> None:
    settings = DecodeSettings(step_deadline_s=1.0, max_consecutive_late=3, no_slice_extensions=2)
    machine = Decoding(plan(["a"]), settings, started=0.0)
    machine.start(0.0)
    machine.apply(Arrived("a", slice_of("a", 0, b"hi")), 0.1)
    probes = [machine.apply(Tick(), t) for t in (1.2, 2.3)]  # two more deadlines, each probed
    assert [[type(a) for a in out] for out in probes] == [[Probe], [Probe]]
    assert not machine.finished
    out = machine.apply(Arrived("a", slice_of("a", 1, b"hi")), 2.5)  # slow, not gone: taken
    assert machine.step == 2 and machine.tracker.late == {}
    machine.apply(Tick(), 3.6)
    machine.apply(Tick(), 4.7)
    out = machine.apply(Tick(), 5.8)
    errors = [a.message for a in out if isinstance(a, ToClient)]
    assert machine.finished and [e.code for e in errors] == ["no_slices"]  # type: ignore[union-attr]


# --- 1. an expert killed or stopped mid-answer ---------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
async def test_an_expert_lost_mid_answer_costs_one_step_deadline_and_is_named(
    procs: Procs, sig: signal.Signals
) -> None:
    """Before: three full step deadlines (three late steps in a row) before it was dropped. Now:
    the step it misses ends at its deadline with the others' slices, and the probe sent then
    (or the server's no-responders answer to the next Step) drops it at once."""
    experts = scripted_bus(procs, 3, delay_s=0.1)
    victim = experts[2]
    with anyio.fail_after(60):
        clean, clean_s = await timed_answer(procs.url)
        assert clean.text == TEXT and clean.dropped == []
        async with moe2.connect(procs.url, name="faults-client") as client:
            started = time.monotonic()
            answer = client.ask(TEXT, step_deadline_s=DEADLINE_S)
            async for chunk in answer:
                if chunk.index == 3:
                    procs.signal(victim, sig)
            took = time.monotonic() - started
    final = answer.final
    assert final is not None and final.text == TEXT
    assert final.dropped == [victim]
    # one deadline (the step it missed), a probe of at most half a deadline, and scheduling
    assert took - clean_s < 1.8 * DEADLINE_S, (took, clean_s)


# --- 2. a new question right after an expert's death ---------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
async def test_a_new_question_right_after_an_expert_is_lost_is_answered_by_the_others(
    procs: Procs, sig: signal.Signals
) -> None:
    """Heartbeats every 2 s: the fusion agent still counts the lost expert as a member when the
    question comes 0.2 s after. A killed one answers the Open with no responders (dropped at
    once); a stopped one misses step 0's deadline and its probe. The next question leaves it out."""
    experts = scripted_bus(procs, 3, heartbeat_s=2.0)
    victim = experts[0]
    with anyio.fail_after(60):
        clean, clean_s = await timed_answer(procs.url)
        assert clean.experts == sorted(experts)
        procs.signal(victim, sig)
        await anyio.sleep(0.2)
        first, first_s = await timed_answer(procs.url)
        second, second_s = await timed_answer(procs.url)
    assert first.text == second.text == TEXT
    assert first.dropped == [victim] or victim not in first.experts
    extra = 0.5 if sig == signal.SIGKILL else 1.8 * DEADLINE_S  # a stopped one: one deadline
    assert first_s - clean_s < extra, (first_s, clean_s)
    assert victim not in second.experts and second.dropped == []
    assert second_s - clean_s < 0.5, (second_s, clean_s)


# --- 3. the fusion agent killed or stopped -------------------------------------------------------


async def test_the_fusion_agent_killed_mid_answer_is_a_clear_error_within_3_s(
    procs: Procs,
) -> None:
    scripted_bus(procs, 2, delay_s=0.3)  # about 6 s for the whole answer
    with anyio.fail_after(30):
        async with moe2.connect(procs.url, name="faults-client") as client:
            answer = client.ask(TEXT, step_deadline_s=DEADLINE_S)
            with pytest.raises(Moe2Error) as caught:
                async for chunk in answer:
                    if chunk.index == 2:
                        procs.signal("fusion0", signal.SIGKILL)
                        killed = time.monotonic()
            noticed = time.monotonic() - killed
    assert caught.value.code == ErrorCode.FUSION_LOST
    assert "stopped" in caught.value.message
    assert noticed < 3.0, noticed


async def test_the_fusion_agent_stopped_before_the_answer_is_a_clear_error_within_3_s(
    procs: Procs,
) -> None:
    """Stopped while it plans (no Chunk yet): its keepalives stop, the client says so."""
    scripted_bus(procs, 1, delay_s=2.0)  # the first chunk after 2 s
    with anyio.fail_after(30):
        async with moe2.connect(procs.url, name="faults-client") as client:
            answer = client.ask(TEXT, step_deadline_s=5.0)
            started = time.monotonic()
            async with anyio.create_task_group() as tg:

                async def stop_soon() -> None:
                    await anyio.sleep(0.5)  # the agent took the prompt: its keepalive came
                    procs.signal("fusion0", signal.SIGSTOP)

                tg.start_soon(stop_soon)
                with pytest.raises(Moe2Error) as caught:
                    await answer.collect()
            took = time.monotonic() - started
    assert caught.value.code == ErrorCode.FUSION_LOST
    assert took < 0.5 + 3.0, took


async def test_a_stopped_fusion_agent_in_the_queue_group_costs_a_retry_not_a_timeout(
    procs: Procs,
) -> None:
    """Two fusion agents, one stopped: before, half the questions timed out after 60 s. Now a
    prompt the stopped one got is asked again after 1 s without a first message."""
    scripted_bus(procs, 2, fusions=2)
    procs.signal("fusion1", signal.SIGSTOP)
    with anyio.fail_after(90):
        _, clean_s = await timed_answer(procs.url)
        times = []
        for _ in range(6):
            final, took = await timed_answer(procs.url)
            assert final.text == TEXT
            times.append(took)
    # 1 s per retry, and each ask reaches the stopped agent with probability 1/2: most questions
    # need none or one; 12 retries or more happen to a question once in 4,096 (a bound of 6 failed
    # a CI run when one question met the stopped agent 8 times running)
    assert sorted(times)[len(times) // 2] < clean_s + 2.0, times
    assert max(times) < clean_s + 12.0, times


async def test_a_killed_fusion_agent_in_the_queue_group_costs_nothing(procs: Procs) -> None:
    scripted_bus(procs, 2, fusions=2)
    procs.signal("fusion1", signal.SIGKILL)
    procs.procs["fusion1"].wait(10)
    with anyio.fail_after(60):
        _, clean_s = await timed_answer(procs.url)
        for _ in range(4):
            final, took = await timed_answer(procs.url)
            assert final.text == TEXT and took < clean_s + 0.5


# --- 5. overload: real SmolLM2 experts ------------------------------------------------------------


def smollm2_bus(procs: Procs, prefix: str, experts: dict[str, int]) -> None:
    """`moe2 expert` processes (SmolLM2, id -> its --max-sessions) and one fusion agent."""
    for e, limit in experts.items():
        args = ["--id", e, "--threads", "1", "--no-warmup", "--max-sessions", str(limit)]
        procs.moe2(e, "expert", *args, "--prefix", prefix)
    if "fusion0" not in procs.procs:
        procs.moe2("fusion0", "fusion", "--prefix", prefix)
    procs.wait_logged("fusion0", "fusion_ready")
    procs.wait_logged("fusion0", "expert_joined", len(procs.procs) - 1, limit_s=180)


async def concurrent(url: str, prefix: str, n: int, **ask: object) -> list[wire.Final | Moe2Error]:
    """``n`` questions at once; each one's Final or error."""
    results: list[wire.Final | Moe2Error] = []

    async def one(client: moe2.Client) -> None:
        try:
            results.append(await client.ask("Name a colour.", **ask).collect())  # type: ignore[arg-type]
        except Moe2Error as exc:
            results.append(exc)

    async with (
        moe2.connect(url, prefix=prefix, name="faults-client") as client,
        anyio.create_task_group() as tg,
    ):
        for _ in range(n):
            tg.start_soon(one, client)
    return results


async def test_an_expert_at_capacity_refuses_with_busy_and_the_others_answer(
    procs: Procs,
) -> None:
    """One expert with room for one session: of two questions at once, one is answered and the
    other refused with ``busy`` at once (not a deadline). With a second expert on the bus, the
    session the first refuses goes on with the second."""
    prefix = f"ovl{next(_names)}"
    smollm2_bus(procs, prefix, {"one": 1})
    with anyio.fail_after(120):
        results = await concurrent(procs.url, prefix, 2, max_tokens=8)
    codes = sorted(r.code if isinstance(r, Moe2Error) else "final" for r in results)
    assert codes == [ErrorCode.BUSY, "final"], results
    smollm2_bus(procs, prefix, {"two": 4})
    with anyio.fail_after(120):
        results = await concurrent(procs.url, prefix, 2, max_tokens=8)
    finals = [r for r in results if isinstance(r, wire.Final)]
    assert len(finals) == 2, results
    assert all(f.text and f.finish_reason in ("eos", "length") for f in finals)
    assert "request_refused" in procs.log("one") and "busy" in procs.log("one")


@pytest.mark.slow
async def test_one_expert_with_16_questions_at_once_answers_them_all_slower(
    procs: Procs,
) -> None:
    """The issue's example: one SmolLM2 expert, 16 questions at once, the default 2 s step
    deadline. Before continuous batching 11 of 16 failed with ``no_slices``; admitted sessions
    must get slower, never fail by deadline because of load alone."""
    prefix = f"ovl{next(_names)}"
    smollm2_bus(procs, prefix, {"solo": 32})
    started = time.monotonic()
    with anyio.fail_after(300):
        results = await concurrent(procs.url, prefix, 16, max_tokens=32)
    took = time.monotonic() - started
    failed = [r for r in results if isinstance(r, Moe2Error)]
    print(
        f"16 questions on one expert: {16 - len(failed)} answered, {len(failed)} failed "
        f"({sorted({str(f.code) for f in failed})}) in {took:.1f} s"
    )
    assert not failed, failed


async def test_a_prompt_taken_twice_after_a_retry_cancels_the_second_session(
    nats_url: str,
) -> None:
    """A fusion agent that takes the prompt late (after the client asked again) starts a second
    session: the client keeps the first one to answer and cancels the other."""
    prefix = f"dup{next(_names)}"
    subjects = Subjects(prefix)
    cancelled: list[wire.Cancel] = []
    asked: list[str] = []
    async with moe2.connect(nats_url, prefix=prefix) as client:
        nc = client.nc

        async def answer(session: str, reply: str, delay_s: float, pieces: int) -> None:
            await anyio.sleep(delay_s)
            for i in range(pieces):
                chunk = wire.Chunk(session=session, index=i, text="x", tokens=[1])
                await nc.publish(reply, wire.encode(chunk))
                await anyio.sleep(0.3)
            final = wire.Final(
                session=session,
                text="x" * pieces,
                finish_reason="length",
                usage=wire.Usage(prompt_tokens=1, completion_tokens=pieces),
                timings=wire.Timings(0.0, 0.0, 0.0, 0.0, 0.0),
                experts=[],
                weights=[],
                late={},
                dropped=[],
            )
            await nc.publish(reply, wire.encode(final))

        async with anyio.create_task_group() as tg:

            async def on_prompt(msg: object) -> None:
                asked.append(msg.reply)  # type: ignore[attr-defined]
                late = len(asked) == 1  # the first agent to take it answers after the retry
                name = "late" if late else "first"
                tg.start_soon(answer, name, msg.reply, 1.4 if late else 0.0, 6)  # type: ignore[attr-defined]

            async def on_cancel(msg: object) -> None:
                cancelled.append(wire.decode(msg.data))  # type: ignore[attr-defined, arg-type]

            await nc.subscribe(subjects.prompt, cb=on_prompt)
            await nc.subscribe(subjects.cancel("late"), cb=on_cancel)
            await nc.flush()
            with anyio.fail_after(10):
                final = await client.ask("x", max_tokens=6).collect()
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
    assert final.session == "first" and final.text == "xxxxxx"
    assert len(asked) == 2  # asked again once, after the first second of silence
    assert [(c.session, c.reason) for c in cancelled] == [("late", "duplicate")]


async def test_the_server_killed_mid_answer_and_restarted_costs_seconds_not_a_timeout(
    tmp_path: Path,
) -> None:
    """The one nats-server killed (SIGKILL) mid-answer and started again on its port: the answer
    in flight finishes or ends with a clear error within seconds, and the next question, once
    everyone has reconnected, is answered (before: the client waited 60 s, then timed out)."""
    server = NatsServer().start()
    procs = Procs(server.url, tmp_path)
    try:
        scripted_bus(procs, 2, delay_s=0.3)  # about 6 s for the whole answer
        async with moe2.connect(server.url, name="faults-client") as client:
            outcome: str | ErrorCode = ""
            with anyio.fail_after(30):
                try:
                    async for chunk in client.ask(TEXT, step_deadline_s=DEADLINE_S):
                        if chunk.index == 2:
                            server.kill()
                            killed = time.monotonic()
                            await anyio.sleep(0.5)
                            server.start()
                    outcome = "answered"
                except Moe2Error as exc:
                    outcome = exc.code
            ended = time.monotonic() - killed
            assert outcome in ("answered", ErrorCode.FUSION_LOST, ErrorCode.NO_SLICES), outcome
            assert ended < 10.0, (outcome, ended)
            with anyio.fail_after(30):
                while True:  # the experts' heartbeats bring them back to the fusion agent
                    try:
                        final = await client.ask(TEXT, step_deadline_s=DEADLINE_S).collect()
                        break
                    except Moe2Error as exc:
                        assert exc.code in (ErrorCode.NO_EXPERTS, ErrorCode.NO_FUSION_AGENT), exc
                        await anyio.sleep(0.2)
            back = time.monotonic() - killed
        print(f"server killed: {outcome} after {ended:.2f} s, answered again {back:.2f} s later")
        assert final.text == TEXT
        assert back < 20.0, back
    finally:
        procs.stop()
        server.stop()
