"""``moe2 status``: a live view of a pool, from what its agents say on the bus (docs/status.md).

It only listens, and publishes nothing:

- heartbeats (``<prefix>.v1.members.*``): each expert's model, its adapter (the ``+lora:`` part of
  the model name) and context (``+ctx:``), quantisation, backend, device profile, the sessions it
  holds, and the age of its last heartbeat;
- the fusion agents' announcements of S (``<prefix>.v1.selection``): S, its predicted delay,
  energy and loss, and who was left out (the budgets are not announced: a fusion agent's
  /metrics has them);
- slices (``<prefix>.v1.session.*.slice.*``): tokens/s per expert (the slices it sends) and of
  the pool (distinct steps of the sessions), over the last ``WINDOW_S``;
- Steps (``<prefix>.v1.expert.*.step``): how far each session has got, so that a slice for a
  step the fusion agent has already moved past is counted late.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Final

import anyio
import typer
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from moe2.runtime import wire
from moe2.runtime.logs import configure_logging
from moe2.runtime.subjects import Subjects

WINDOW_S: Final = 10.0  # tokens/s and late rates are over this much of the recent past
MISSED_HEARTBEATS: Final = 2  # a fusion agent's rule: silent this many intervals is gone
FORGET_S: Final = 300.0  # an expert silent this long leaves the table
SESSIONS_KEPT: Final = 1024  # sessions whose last step is remembered (the oldest go first)


@dataclass
class ExpertSeen:
    """One expert as heard on the bus: its last heartbeat and its recent slices."""

    heartbeat: wire.Heartbeat
    heard_at: float
    slices: deque[float] = field(default_factory=deque)  # arrival times, last WINDOW_S
    late: deque[float] = field(default_factory=deque)  # those that came after their step

    def age(self, now: float) -> float:
        return now - self.heard_at

    def live(self, now: float) -> bool:
        return self.age(now) <= MISSED_HEARTBEATS * self.heartbeat.interval_s


class PoolView:
    """What the bus has said, as pure bookkeeping: every method takes the clock's value."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.experts: dict[str, ExpertSeen] = {}
        self.selections: dict[str, wire.SubsetAnnouncement] = {}  # by fusion agent
        self.reached: OrderedDict[str, int] = OrderedDict()  # session -> its last Step's step
        self.sliced_up_to: OrderedDict[str, int] = OrderedDict()  # session -> its last slice's
        self.tokens: deque[tuple[float, str]] = deque()  # (time, session) of each new step

    def heard(self, heartbeat: wire.Heartbeat, now: float) -> None:
        seen = self.experts.get(heartbeat.expert)
        if seen is None:
            self.experts[heartbeat.expert] = ExpertSeen(heartbeat, now)
        else:
            seen.heartbeat, seen.heard_at = heartbeat, now

    def announced(self, announcement: wire.SubsetAnnouncement) -> None:
        self.selections[announcement.agent] = announcement

    def stepped(self, step: wire.Step) -> None:
        """A Step for ``step`` went out: the session's earlier steps are over."""
        _advance(self.reached, step.session, step.step)

    def sliced(self, s: wire.Slice, now: float) -> None:
        if _advance(self.sliced_up_to, s.session, s.step):  # a new step: the pool made a token
            self.tokens.append((now, s.session))
        seen = self.experts.get(s.expert)
        if seen is None:
            return  # not heard yet: its first heartbeat comes within its interval
        seen.slices.append(now)
        if s.step < self.reached.get(s.session, -1):  # the next step had gone out without it
            seen.late.append(now)

    def forget_old(self, now: float) -> None:
        """Drop what is older than the window, and experts silent for ``FORGET_S``."""
        since = now - WINDOW_S
        for seen in self.experts.values():
            for times in (seen.slices, seen.late):
                while times and times[0] < since:
                    times.popleft()
        while self.tokens and self.tokens[0][0] < since:
            self.tokens.popleft()
        gone = [e for e, seen in self.experts.items() if seen.age(now) > FORGET_S]
        for expert in gone:
            del self.experts[expert]

    def window(self, now: float) -> float:
        """The seconds the rates are over: the window, or less since watching began."""
        return max(min(WINDOW_S, now - self.started), 1e-9)

    def tokens_per_s(self, now: float) -> float:
        return len(self.tokens) / self.window(now)

    def recent_sessions(self) -> int:
        return len({session for _, session in self.tokens})


def _advance(steps: OrderedDict[str, int], session: str, step: int) -> bool:
    """Note that ``session`` reached ``step``; False if it had already (bounded table)."""
    if step <= steps.get(session, -1):
        return False
    steps[session] = step
    steps.move_to_end(session)
    while len(steps) > SESSIONS_KEPT:
        steps.popitem(last=False)
    return True


def model_parts(model: str) -> tuple[str, str]:
    """A heartbeat's model name split into the base model and what is added to it: the LoRA
    adapter (``+lora:cluster-3@b96c4cd9`` -> ``cluster-3``) and the context (``ctx:name``)."""
    base, *extras = model.split("+")
    added = [e.removeprefix("lora:").split("@")[0] if e.startswith("lora:") else e for e in extras]
    return base, " ".join(a.split("@")[0] for a in added)


def render(view: PoolView, now: float, source: str) -> Group:
    view.forget_old(now)
    return Group(
        Text(f"moe2 pool on {source}", style="bold"),
        experts_table(view, now),
        selection_table(view),
        Text(summary_line(view, now)),
    )


def experts_table(view: PoolView, now: float) -> Table:
    table = Table(title="experts", title_justify="left", expand=False)
    for column in ("expert", "model", "adapter", "quant", "backend", "device", "decode"):
        table.add_column(column, no_wrap=True)
    for column in ("heartbeat", "sessions", "tokens/s", "late"):
        table.add_column(column, justify="right", no_wrap=True)
    window = view.window(now)
    for expert, seen in sorted(view.experts.items()):
        hb = seen.heartbeat
        base, adapter = model_parts(hb.model)
        device = hb.device
        table.add_row(
            expert,
            base,
            adapter or "-",
            hb.quantisation or "?",
            hb.backend,
            f"{device.name} {device.power_w:g} W {hb.energy_source}" if device else "-",
            f"{device.decode_s * 1000:.0f} ms" if device and device.decode_s else "-",
            f"{seen.age(now):.1f} s ago" if seen.live(now) else f"gone ({seen.age(now):.0f} s)",
            str(hb.sessions),
            f"{len(seen.slices) / window:.1f}",
            late_text(len(seen.late), len(seen.slices)),
        )
    if not view.experts:
        table.add_row("(no heartbeat heard yet)", *[""] * 10)
    return table


def late_text(late: int, slices: int) -> str:
    return f"{100 * late / slices:.0f}% ({late}/{slices})" if slices else "-"


def selection_table(view: PoolView) -> Table:
    table = Table(title="S, as the fusion agents announce it", title_justify="left")
    for column in ("fusion agent", "version", "S", "delay", "energy", "loss", "why"):
        table.add_column(column)
    for agent, a in sorted(view.selections.items()):
        delay = ", ".join(f"{app} {s:.3f} s" for app, s in a.delay_s.items()) or "-"
        left = "; ".join(f"{e}: {why}" for e, why in a.left_out.items())
        why = " · ".join(x for x in (a.reason, a.error or "", f"left out {left}" if left else ""))
        table.add_row(
            agent,
            f"v{a.version}",
            "{" + ", ".join(a.experts) + "}",
            delay,
            "-" if a.energy_j is None else f"{a.energy_j:.2f} J",
            "-" if a.loss is None else f"{a.loss:.4f}",
            why.strip(" ·"),
        )
    if not view.selections:
        table.add_row("(none heard: without SMO every live expert may serve)", *[""] * 6)
    table.caption = (
        "budgets are not announced: a fusion agent's /metrics has them (docs/metrics.md)"
    )
    return table


def summary_line(view: PoolView, now: float) -> str:
    live = sum(seen.live(now) for seen in view.experts.values())
    held = sum(seen.heartbeat.sessions for seen in view.experts.values() if seen.live(now))
    window = view.window(now)
    return (
        f"{live} of {len(view.experts)} experts live · sessions held by experts: {held} · "
        f"in the last {window:.0f} s: {view.recent_sessions()} sessions, "
        f"{view.tokens_per_s(now):.1f} tokens/s"
    )


async def watch_pool(nc: NATS, subjects: Subjects, view: PoolView) -> None:
    """Feed ``view`` from the bus (four subscriptions, callbacks only) until cancelled."""

    def listener(
        take: Callable[[wire.Message, float], None],
    ) -> Callable[[Msg], Awaitable[None]]:
        async def on_message(msg: Msg) -> None:
            try:
                message = wire.decode(msg.data)
            except Exception:  # not ours to answer: the agents' own endpoints refuse it
                return
            take(message, time.monotonic())

        return on_message

    def take(message: wire.Message, now: float) -> None:
        if isinstance(message, wire.Heartbeat):
            view.heard(message, now)
        elif isinstance(message, wire.SubsetAnnouncement):
            view.announced(message)
        elif isinstance(message, wire.Slice):
            view.sliced(message, now)
        elif isinstance(message, wire.Step):
            view.stepped(message)

    for subject in (
        subjects.members,
        subjects.selection,
        subjects.session_slices("*"),
        subjects.expert_step("*"),
    ):
        await nc.subscribe(subject, cb=listener(take))
    await nc.flush()


def status(
    nats_url: Annotated[
        str, typer.Option("--nats", help="NATS server URL.", envvar="MOE2_NATS")
    ] = "nats://127.0.0.1:4222",
    prefix: Annotated[str, typer.Option(help="Subject prefix.")] = "moe2",
    once: Annotated[
        bool, typer.Option(help="Listen for --wait seconds, print one snapshot and exit.")
    ] = False,
    wait: Annotated[
        float,
        typer.Option(
            help="With --once: seconds to listen (S is announced on a change and repeated "
            "every 10 s: 11 always hears it)."
        ),
    ] = 3.0,
    refresh: Annotated[float, typer.Option(help="Seconds between redraws.")] = 0.5,
) -> None:
    """A live view of the pool: experts, health, S, sessions and tokens/s (docs/status.md)."""
    from moe2.cli_support import run_async
    from moe2.runtime.connection import close_nats, connect_nats

    configure_logging("warning")  # log lines would tear the view

    async def main() -> None:
        nc = await connect_nats(nats_url, name="moe2-status")
        try:
            view = PoolView(time.monotonic())
            await watch_pool(nc, Subjects(prefix), view)
            console = Console()
            if once:
                await anyio.sleep(wait)
                wide = console if console.is_terminal else Console(width=200)
                wide.print(render(view, time.monotonic(), nats_url))
                return
            snapshot = render(view, time.monotonic(), nats_url)
            with Live(snapshot, console=console, auto_refresh=False) as live:
                while True:
                    await anyio.sleep(refresh)
                    live.update(render(view, time.monotonic(), nats_url), refresh=True)
        finally:
            await close_nats(nc)

    run_async(main)
