"""``moe2 status``: a live view of a pool, from what its agents say on the bus (docs/status.md).

It listens, and asks only the standard ``$SRV.INFO`` of NATS micro services:

- heartbeats (``<prefix>.v1.members.*``): each expert's model, its adapter (the ``+lora:`` part of
  the model name) and context (``+ctx:``), quantisation, backend, device profile, the sessions it
  holds, and the age of its last heartbeat;
- the fusion agents' announcements of S (``<prefix>.v1.selection``): S, its predicted delay,
  energy and loss, and who was left out;
- the fusion agents' ``$SRV.INFO`` (it asks ``$SRV.INFO.moe2-fusion`` every ``INFO_EVERY_S``,
  its only request): their selection, budgets and sessions in flight (docs/discovery.md);
- slices (``<prefix>.v1.session.*.slice.*``): tokens/s per expert (the slices it sends) and of
  the pool (distinct steps of the sessions), over the last ``WINDOW_S``;
- Steps (``<prefix>.v1.expert.*.step``): how far each session has got, so that a slice for a
  step the fusion agent has already moved past is counted late.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Final
from urllib.parse import urlsplit, urlunsplit

import anyio
import typer
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from moe2.agents.discovery import FUSION_SERVICE
from moe2.runtime import wire
from moe2.runtime.logs import configure_logging
from moe2.runtime.subjects import Subjects

WINDOW_S: Final = 10.0  # tokens/s and late rates are over this much of the recent past
MISSED_HEARTBEATS: Final = 2  # a fusion agent's rule: silent this many intervals is gone
FORGET_S: Final = 300.0  # an expert silent this long leaves the table
SESSIONS_KEPT: Final = 1024  # sessions whose last step is remembered (the oldest go first)
INFO_EVERY_S: Final = 2.0  # how often the fusion agents' $SRV.INFO is asked
INFO_KEPT_S: Final = 3 * INFO_EVERY_S  # a fusion agent silent this long to it leaves the view


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


@dataclass
class FusionSeen:
    """One fusion agent's last ``$SRV.INFO`` metadata (strings, docs/discovery.md)."""

    metadata: dict[str, str]
    heard_at: float


class PoolView:
    """What the bus has said, as pure bookkeeping: every method takes the clock's value."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.experts: dict[str, ExpertSeen] = {}
        self.selections: dict[str, wire.SubsetAnnouncement] = {}  # by fusion agent
        self.fusion: dict[str, FusionSeen] = {}  # by fusion agent, from $SRV.INFO
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

    def described(self, metadata: dict[str, str], now: float) -> None:
        """A fusion agent's ``$SRV.INFO`` metadata (it names the agent)."""
        self.fusion[metadata["agent"]] = FusionSeen(metadata, now)

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
        quiet = [a for a, seen in self.fusion.items() if now - seen.heard_at > INFO_KEPT_S]
        for agent in quiet:
            del self.fusion[agent]

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


EXPERT_COLUMNS: Final = (
    "expert", "model", "adapter", "quant", "backend", "device", "decode",
    "heartbeat", "sessions", "tokens/s", "late",
)  # fmt: skip
FUSION_COLUMNS: Final = (
    "fusion agent", "selection", "version", "S", "delay", "energy", "loss", "budgets",
    "sessions", "why",
)  # fmt: skip
RIGHT_ALIGNED: Final = frozenset({"heartbeat", "sessions", "tokens/s", "late"})


@dataclass(frozen=True)
class Snapshot:
    """What the view shows at one moment, as text cells: the terminal's tables and the
    dashboard's (``GET /status`` of the gateway) are both drawn from it."""

    source: str
    experts: list[list[str]]  # one row per expert, EXPERT_COLUMNS
    live: list[bool]  # per expert row: heard within its last two heartbeat intervals
    fusion: list[list[str]]  # one row per fusion agent, FUSION_COLUMNS
    summary: str

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "experts": {"columns": list(EXPERT_COLUMNS), "rows": self.experts, "live": self.live},
            "fusion": {"columns": list(FUSION_COLUMNS), "rows": self.fusion},
            "summary": self.summary,
        }


def snapshot(view: PoolView, now: float, source: str) -> Snapshot:
    view.forget_old(now)
    experts = sorted(view.experts.items())
    return Snapshot(
        source=source,
        experts=[expert_row(expert, seen, now, view.window(now)) for expert, seen in experts],
        live=[seen.live(now) for _, seen in experts],
        fusion=[fusion_row(view, agent) for agent in sorted({*view.selections, *view.fusion})],
        summary=summary_line(view, now),
    )


def render(shot: Snapshot) -> Group:
    experts = table("experts", EXPERT_COLUMNS, shot.experts, "(no heartbeat heard yet)")
    fusion = table(
        "fusion agents: S and budgets", FUSION_COLUMNS, shot.fusion, "(no fusion agent heard yet)"
    )
    fusion.caption = "S from their announcements, budgets and sessions from $SRV.INFO"
    return Group(
        Text(f"moe2 pool on {shot.source}", style="bold"), experts, fusion, Text(shot.summary)
    )


def table(title: str, columns: tuple[str, ...], rows: list[list[str]], empty: str) -> Table:
    out = Table(title=title, title_justify="left", expand=False)
    for column in columns:
        out.add_column(column, justify="right" if column in RIGHT_ALIGNED else "left")
    for row in rows or [[empty, *[""] * (len(columns) - 1)]]:
        out.add_row(*row)
    return out


def expert_row(expert: str, seen: ExpertSeen, now: float, window: float) -> list[str]:
    hb = seen.heartbeat
    base, adapter = model_parts(hb.model)
    device = hb.device
    return [
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
    ]


def late_text(late: int, slices: int) -> str:
    return f"{100 * late / slices:.0f}% ({late}/{slices})" if slices else "-"


def fusion_row(view: PoolView, agent: str) -> list[str]:
    """S as the agent last announced it; its selection, budgets and sessions from $SRV.INFO."""
    a = view.selections.get(agent)
    seen = view.fusion.get(agent)
    meta = seen.metadata if seen is not None else {}
    selection = meta.get("selection") or ("smo" if a is not None else "?")
    described = [budgets_text(meta) if seen else "?", meta.get("sessions", "?")]
    if a is None:
        every = "all live" if selection == "all-live" else "(not announced yet)"
        return [agent, selection, "-", every, "-", "-", "-", *described, ""]
    delay = ", ".join(f"{app} {s:.3f} s" for app, s in a.delay_s.items()) or "-"
    left = "; ".join(f"{e}: {why}" for e, why in a.left_out.items())
    why = " · ".join(x for x in (a.reason, a.error or "", f"left out {left}" if left else ""))
    return [
        agent,
        selection,
        f"v{a.version}",
        "{" + ", ".join(a.experts) + "}",
        delay,
        "-" if a.energy_j is None else f"{a.energy_j:.2f} J",
        "-" if a.loss is None else f"{a.loss:.4f}",
        *described,
        why.strip(" ·"),
    ]


def budgets_text(metadata: dict[str, str]) -> str:
    """``$SRV.INFO`` metadata's ``tau_s`` (JSON) and ``energy_j`` as ``delay chat ≤ 2 s · energy
    ≤ 40 J``; ``none`` without limits, ``?`` when the metadata cannot be read."""
    try:
        tau = json.loads(metadata.get("tau_s") or "{}")
        energy = metadata.get("energy_j", "")
        parts = [f"delay {app} ≤ {float(s):g} s" for app, s in sorted(tau.items())]
        parts += [f"energy ≤ {float(energy):g} J"] if energy else []
    except (ValueError, TypeError, AttributeError):
        return "?"
    return " · ".join(parts) or "none"


def summary_line(view: PoolView, now: float) -> str:
    live = sum(seen.live(now) for seen in view.experts.values())
    held = sum(seen.heartbeat.sessions for seen in view.experts.values() if seen.live(now))
    flying = sum(_count(f.metadata.get("sessions", "")) for f in view.fusion.values())
    window = view.window(now)
    return (
        f"{live} of {len(view.experts)} experts live · sessions in flight: {flying} "
        f"(fusion agents), {held} held by experts · "
        f"in the last {window:.0f} s: {view.recent_sessions()} sessions, "
        f"{view.tokens_per_s(now):.1f} tokens/s"
    )


def public_url(url: str) -> str:
    """``url`` without the password of its user part (``nats://u:secret@h`` -> ``nats://u@h``):
    what a view may print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}"))


def _count(text: str) -> int:
    return int(text) if text.isdigit() else 0


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


class PoolWatch:
    """A ``PoolView`` fed from the bus: ``watch_pool``'s subscriptions, and the fusion agents'
    ``$SRV.INFO`` asked again by ``refresh`` every ``INFO_EVERY_S`` (answers to an inbox)."""

    def __init__(self, nc: NATS, prefix: str, source: str) -> None:
        self.nc, self.prefix, self.source = nc, prefix, public_url(source)
        self.view = PoolView(time.monotonic())
        self.inbox = nc.new_inbox()
        self.asked_at = -INFO_EVERY_S

    async def start(self) -> None:
        await watch_pool(self.nc, Subjects(self.prefix), self.view)
        await self.nc.subscribe(self.inbox, cb=self._on_info)
        await self.refresh()

    async def refresh(self) -> None:
        """Ask the fusion agents' ``$SRV.INFO`` if the last ask is ``INFO_EVERY_S`` old."""
        now = time.monotonic()
        if now - self.asked_at >= INFO_EVERY_S:
            self.asked_at = now
            await self.nc.publish(f"$SRV.INFO.{FUSION_SERVICE}", b"", reply=self.inbox)

    def snapshot(self) -> Snapshot:
        return snapshot(self.view, time.monotonic(), self.source)

    async def _on_info(self, msg: Msg) -> None:
        try:
            metadata = json.loads(msg.data)["metadata"]
            ours = metadata.get("prefix") == self.prefix and isinstance(metadata["agent"], str)
        except (ValueError, TypeError, KeyError, AttributeError):  # not a fusion agent's answer
            return
        if ours:
            self.view.described(metadata, time.monotonic())


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
            watch = PoolWatch(nc, prefix, nats_url)
            await watch.start()
            console = Console()
            if once:
                until = time.monotonic() + wait
                while (left := until - time.monotonic()) > 0:
                    await anyio.sleep(min(left, refresh))
                    await watch.refresh()
                wide = console if console.is_terminal else Console(width=240)
                wide.print(render(watch.snapshot()))
                return
            with Live(render(watch.snapshot()), console=console, auto_refresh=False) as live:
                while True:
                    await anyio.sleep(refresh)
                    await watch.refresh()
                    live.update(render(watch.snapshot()), refresh=True)
        finally:
            await close_nats(nc)

    run_async(main)
