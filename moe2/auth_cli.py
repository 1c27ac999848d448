"""``moe2 auth``: the per-role NATS users of a local set-up, and the credential options every
command takes (docs/security.md)."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from moe2.runtime.auth import ENV, AuthDir, default_auth_dir
from moe2.runtime.errors import Moe2Error

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)

AuthDirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="The credentials directory (default: $MOE2_AUTH_DIR or ~/.config/moe2/nats).",
    ),
]


def _ids(experts: str) -> list[str]:
    return [e.strip() for e in experts.split(",") if e.strip()]


def how_to_connect(auth: AuthDir) -> str:
    """Where the credentials are and how each role's process picks them up."""
    lines = [f"NATS credentials (nkey seeds, owner-only) in {auth.path}:"]
    for role in auth.roles():
        lines.append(f"  {role:<16} {auth.env_lines(role)}")
    lines += [
        "each agent reads MOE2_NATS_NKEY (or: moe2 <command> --nats-nkey FILE ...):",
        f"  MOE2_NATS_NKEY={auth.seed_file('fusion')} moe2 fusion",
        f"  MOE2_NATS_NKEY={auth.path}/expert-<id>.nk moe2 expert --id <id>",
        f"  MOE2_NATS_NKEY={auth.seed_file('client')} moe2 ask 'a question'",
        f"  MOE2_NATS_NKEY={auth.seed_file('admin')} moe2 status",
        "a new expert: moe2 auth add-expert <id>; a client user with an inbox of its own: "
        "moe2 auth add-client <name> (the running server reloads its users)",
    ]
    return "\n".join(lines)


@app.command()
def init(
    directory: AuthDirOption = None,
    experts: Annotated[str, typer.Option(help="Expert ids, comma-separated: a,b,c.")] = "",
) -> None:
    """Create the seeds of client, fusion, admin and the experts (existing ones are kept)."""
    auth = AuthDir(directory or default_auth_dir())
    try:
        made = auth.init(_ids(experts))
        auth.write_authorization()
    except (Moe2Error, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"created: {', '.join(made) or 'nothing (all there)'}", err=True)
    typer.echo(how_to_connect(auth))


@app.command(name="add-expert")
def add_expert(
    expert: Annotated[str, typer.Argument(help="The expert's id (moe2 expert --id).")],
    directory: AuthDirOption = None,
) -> None:
    """A seed for one more expert; a running ``moe2 server`` of this directory reloads."""
    auth = AuthDir(directory or default_auth_dir())
    try:
        made = auth.add_expert(expert)
        auth.write_authorization()
    except (Moe2Error, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"{'created' if made else 'kept'} {auth.expert_file(expert)}")
    _reload(auth)
    typer.echo(f"MOE2_NATS_NKEY={auth.expert_file(expert)} moe2 expert --id {expert}")


@app.command(name="add-client")
def add_client(
    name: Annotated[str, typer.Argument(help="A name for the client user (client-<name>).")],
    directory: AuthDirOption = None,
) -> None:
    """A client user of its own (an inbox no other client can read); the server reloads."""
    auth = AuthDir(directory or default_auth_dir())
    try:
        made = auth.add_client(name)
        auth.write_authorization()
    except (Moe2Error, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    seed = auth.seed_file(f"client-{name}")
    typer.echo(f"{'created' if made else 'kept'} {seed}")
    _reload(auth)
    typer.echo(f"MOE2_NATS_NKEY={seed} moe2 ask 'a question'")


def _reload(auth: AuthDir) -> None:
    pid = auth.reload_server()
    if pid is not None:
        typer.echo(f"nats-server (pid {pid}) reloads its users", err=True)


@app.command()
def show(directory: AuthDirOption = None) -> None:
    """Where each role's credentials are and how its process picks them up."""
    auth = AuthDir(directory or default_auth_dir())
    if not auth.path.is_dir():
        raise typer.BadParameter(f"no credentials in {auth.path}: moe2 auth init")
    typer.echo(how_to_connect(auth))


def _opt(name: str, help_text: str) -> Any:
    return typer.Option(f"--nats-{name}", help=help_text, envvar=ENV[name], show_envvar=True)


def export_credentials(values: dict[str, object | None]) -> None:
    """Put the options given on the command line into ``MOE2_NATS_*``: every connection of this
    process (runtime/connection.py) and the processes it starts read them from there."""
    for name, value in values.items():
        if value is not None and value != "":
            os.environ[ENV[name]] = str(value)


NatsUser = Annotated[str | None, _opt("user", "NATS user name.")]
NatsPassword = Annotated[str | None, _opt("password", "NATS password.")]
NatsToken = Annotated[str | None, _opt("token", "NATS token.")]
NatsNkey = Annotated[Path | None, _opt("nkey", "A file holding an nkey seed (moe2 auth init).")]
NatsCreds = Annotated[Path | None, _opt("creds", "A NATS .creds file (JWT and seed).")]
NatsCa = Annotated[Path | None, _opt("ca", "A CA bundle that signed the server's certificate.")]
NatsCert = Annotated[Path | None, _opt("cert", "A client certificate (mutual TLS).")]
NatsKey = Annotated[Path | None, _opt("key", "The client certificate's key.")]

CREDENTIAL_OPTIONS: dict[str, Any] = {
    "user": NatsUser,
    "password": NatsPassword,
    "token": NatsToken,
    "nkey": NatsNkey,
    "creds": NatsCreds,
    "ca": NatsCa,
    "cert": NatsCert,
    "key": NatsKey,
}


def with_credentials(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` that also takes the ``--nats-*`` options after its own name
    (``moe2 expert --id a --nats-nkey expert-a.nk``), exported as :func:`export_credentials`
    does before it runs."""
    names = {f"nats_{k}": k for k in CREDENTIAL_OPTIONS}

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        export_credentials({k: kwargs.pop(param) for param, k in names.items()})
        return command(*args, **kwargs)

    signature = inspect.signature(command, eval_str=True)  # Annotated[..., typer.Option]
    extra = [
        inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=a)
        for p, a in zip(names, CREDENTIAL_OPTIONS.values(), strict=True)
    ]
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra]
    )
    wrapper.__annotations__ = {
        **command.__annotations__,
        **{p.name: p.annotation for p in extra},
    }
    return wrapper


def add_credential_options(app: typer.Typer, skip: tuple[str, ...] = ()) -> None:
    """Give every command of ``app`` (not its sub-apps, not ``skip``) the ``--nats-*`` options."""
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else "")
        if info.callback is not None and name not in skip:
            info.callback = with_credentials(info.callback)
