"""NATS credentials and TLS for every agent and client, and the per-role users of a local set-up.

:class:`NatsAuth` is what one process connects with: user/password, a token, an nkey seed file or
a creds file, and TLS (a CA, a client certificate and key). It comes from command-line options
over ``MOE2_NATS_*`` environment variables (:meth:`NatsAuth.from_env`); ``connect_nats`` uses the
environment when it is given none. Credentials in the URL (``nats://user:pass@host``) win over the
environment.

:class:`AuthDir` is a local set-up (``moe2 auth init``, ``moe2 server``): one nkey seed per role in
a directory only its owner can read (0700, seeds 0600), and the ``authorization`` block of the
nats-server config that gives each role only the subjects it needs (docs/security.md):

- ``client``: publishes prompts and cancels, reads only its own inbox;
- ``expert-<id>``: publishes only its own slices and heartbeats and replies to the requests it got,
  reads only its own subjects and ``$SRV`` (discovery);
- ``fusion``: the prompt queue group, opens/steps/closes to experts, slices, cancels, heartbeats,
  the selection, replies to clients' inboxes, ``$SRV`` and the agent protocol's ``agents.>``;
- ``admin``: reads everything (``moe2 status``, ``moe2 record``), publishes only ``$SRV``
  requests.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nacl.signing
import nkeys

from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects, check_token

ENV = {
    "user": "MOE2_NATS_USER",
    "password": "MOE2_NATS_PASSWORD",
    "token": "MOE2_NATS_TOKEN",
    "nkey": "MOE2_NATS_NKEY",
    "creds": "MOE2_NATS_CREDS",
    "ca": "MOE2_NATS_CA",
    "cert": "MOE2_NATS_CERT",
    "key": "MOE2_NATS_KEY",
    "inbox_prefix": "MOE2_NATS_INBOX_PREFIX",
}
INBOX = "_INBOX"  # every role's inbox is _INBOX.<its user or nkey>.<nuid>
ROLES = ("client", "fusion", "admin")  # and one "expert-<id>" per expert, "client-<name>" more
_PATHS = {"nkey", "creds", "ca", "cert", "key"}


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """How one process proves who it is to nats-server; every field optional."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey: Path | None = None  # a file holding an nkey seed (SU...)
    creds: Path | None = None  # a .creds file (JWT and seed)
    ca: Path | None = None  # a CA bundle to verify the server
    cert: Path | None = None  # a client certificate (mutual TLS), with ``key``
    key: Path | None = None
    inbox_prefix: str | None = None  # default: _INBOX.<user or nkey public key>

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NatsAuth:
        """The ``MOE2_NATS_*`` variables (empty ones are unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, var in ENV.items():
            value = env.get(var, "")
            if value:
                values[name] = Path(value).expanduser() if name in _PATHS else value
        return cls(**values)

    @classmethod
    def from_toml(cls, path: Path | None) -> NatsAuth:
        """The ``[nats]`` table of an agent's TOML config (``user``, ``password``, ``token``,
        ``nkey``, ``creds``, ``ca``, ``cert``, ``key``, ``inbox_prefix``); files relative to it."""
        if path is None:
            return cls()
        try:
            table = tomllib.loads(path.read_text()).get("nats", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"cannot read {path}: {exc}") from None
        unknown = set(table) - set(ENV)
        if unknown or not all(isinstance(v, str) for v in table.values()):
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"[nats] in {path}: strings among {sorted(ENV)} only, not {sorted(unknown)}",
            )
        values: dict[str, Any] = {
            k: (path.parent / Path(v).expanduser()) if k in _PATHS else v for k, v in table.items()
        }
        return cls(**values)

    @classmethod
    def resolve(cls, config: Path | None = None) -> NatsAuth:
        """What an agent connects with: ``MOE2_NATS_*`` (and the ``--nats-*`` options, which
        set them) over the ``[nats]`` table of its config file."""
        return cls.from_env().over(cls.from_toml(config))

    def over(self, base: NatsAuth) -> NatsAuth:
        """These fields where set, ``base``'s elsewhere (options over the environment)."""
        changes = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{k: v for k, v in changes.items() if v is not None})

    @property
    def has_credentials(self) -> bool:
        return any((self.user, self.token, self.nkey, self.creds))

    def env(self) -> dict[str, str]:
        """The ``MOE2_NATS_*`` variables that give a child process these credentials."""
        out = {}
        for name, var in ENV.items():
            value = getattr(self, name)
            if value is not None:
                out[var] = str(value)
        return out

    def identity(self) -> str | None:
        """The user name or the nkey's public key: what the server knows this process as."""
        if self.user:
            return self.user
        if self.nkey:
            return public_key(read_seed(self.nkey))
        return None

    def inbox(self) -> str | None:
        """This process's inbox prefix: ``_INBOX.<identity>``, the subjects its user may read."""
        if self.inbox_prefix:
            return self.inbox_prefix
        who = self.identity()
        return f"{INBOX}.{who}" if who and _SUBJECT_TOKEN.match(who) else None

    def connect_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``; credentials in ``url`` win over these."""
        opts: dict[str, Any] = {}
        in_url = urlsplit(url.split(",")[0]).username is not None
        if not in_url:
            if self.user:
                opts["user"] = self.user
                opts["password"] = self.password or ""
            if self.token:
                opts["token"] = self.token
            if self.nkey:
                _readable(self.nkey, "nkey seed")
                opts["nkeys_seed"] = str(self.nkey)
            if self.creds:
                _readable(self.creds, "creds file")
                opts["user_credentials"] = str(self.creds)
            inbox = self.inbox()
            if inbox:
                opts["inbox_prefix"] = inbox
        tls = self.tls_context()
        if tls is not None:
            opts["tls"] = tls
        return opts

    def tls_context(self) -> ssl.SSLContext | None:
        """A client TLS context when a CA or client certificate is given."""
        if not (self.ca or self.cert):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            if self.ca:
                ctx.load_verify_locations(cafile=str(self.ca))
            if self.cert:
                ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        except (OSError, ssl.SSLError) as exc:
            raise Moe2Error(ErrorCode.INVALID_FIELD, f"TLS files unusable: {exc}") from None
        return ctx


_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"{what} {path} does not exist")


# --- nkeys ---------------------------------------------------------------------------------------


def new_seed() -> str:
    """A fresh user nkey seed (``SU...``)."""
    raw = bytes(nacl.signing.SigningKey.generate())
    return bytes(nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER)).decode()


def read_seed(path: Path) -> str:
    try:
        seed = path.read_text().strip()
    except OSError as exc:
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"cannot read nkey seed {path}: {exc}") from None
    if not seed.startswith("SU"):
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"{path} does not hold a user nkey seed (SU...)")
    return seed


def public_key(seed: str) -> str:
    """The public key (``U...``) of a user seed."""
    try:
        return bytes(nkeys.from_seed(bytearray(seed.encode())).public_key).decode()
    except Exception as exc:  # nkeys raises its own error types for bad seeds
        raise Moe2Error(ErrorCode.INVALID_FIELD, f"not an nkey seed: {exc}") from None


# --- per-role permissions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Permissions:
    """What one user may publish and subscribe to; ``responses``: replies to requests it got."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responses: bool = False

    def render(self) -> str:
        parts = [
            f"publish: {{allow: {_list(self.publish)}}}",
            f"subscribe: {{allow: {_list(self.subscribe)}}}",
        ]
        if self.responses:
            parts.append("allow_responses: true")
        return "{" + ", ".join(parts) + "}"


def _list(subjects: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"


def role_permissions(role: str, inbox: str, prefix: str = DEFAULT_PREFIX) -> Permissions:
    """The subjects of ``client``, ``fusion``, ``admin`` or ``expert-<id>`` (docs/security.md)."""
    s = Subjects(prefix)
    own_inbox = f"{inbox}.>"
    if role == "client" or role.startswith("client-"):  # each its own inbox
        return Permissions(
            publish=(s.prompt, s.cancel("*")),
            subscribe=(own_inbox,),
        )
    if role == "fusion":
        return Permissions(
            publish=(
                f"{s.root}.expert.*.*",  # open, step, close, score (and the join probe)
                s.selection,
                s.prompt,  # the agent protocol's prompts become moe2 prompts on its connection
                s.cancel("*"),
                f"{INBOX}.>",  # chunks and the Final to every client's inbox
                "agents.>",  # the Synadia agent protocol (heartbeats, replies)
                "$SRV.>",
            ),
            subscribe=(
                s.prompt,
                s.session_slices("*"),
                s.cancel("*"),
                s.members,
                s.selection,
                "agents.>",
                "$SRV.>",
                own_inbox,
            ),
            responses=True,
        )
    if role == "admin":
        return Permissions(publish=("$SRV.>",), subscribe=(">",))
    if role.startswith("expert-"):
        expert = check_token("expert id", role.removeprefix("expert-"))
        return Permissions(
            publish=(s.slice("*", expert), s.member(expert)),
            subscribe=(s.expert_inbox(expert), "$SRV.>", own_inbox),
            responses=True,  # its answers to opens, steps, scores and $SRV requests
        )
    raise ValueError(f"unknown role {role!r}: client, fusion, admin or expert-<id>")


# --- a local set-up ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthDir:
    """One nkey seed per role in ``path`` (0700; each ``<role>.nk`` 0600) and the server's
    ``authorization`` block made from their public keys."""

    path: Path

    def seed_file(self, role: str) -> Path:
        return self.path / f"{role}.nk"

    def expert_file(self, expert: str) -> Path:
        return self.seed_file(f"expert-{check_token('expert id', expert)}")

    @property
    def exists(self) -> bool:
        return all(self.seed_file(r).is_file() for r in ROLES)

    def roles(self) -> list[str]:
        """Every role with a seed here: client, fusion, admin, the experts by id, then the
        named clients."""
        experts = sorted(p.stem for p in self.path.glob("expert-*.nk"))
        clients = sorted(p.stem for p in self.path.glob("client-*.nk"))
        return [r for r in ROLES if self.seed_file(r).is_file()] + experts + clients

    def experts(self) -> list[str]:
        return [r.removeprefix("expert-") for r in self.roles() if r.startswith("expert-")]

    def init(self, experts: Sequence[str] = ()) -> list[str]:
        """Create the directory and any missing seed (existing ones are kept); the new roles."""
        if not self.path.exists():
            self.path.mkdir(parents=True, mode=0o700)
            self.path.chmod(0o700)  # whatever the umask
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise Moe2Error(
                ErrorCode.INVALID_FIELD,
                f"{self.path} is open to others (mode {mode:o}): credentials need a directory "
                "only its owner can enter (chmod 700, or a new one)",
            )
        made = [r for r in ROLES if self._ensure(self.seed_file(r))]
        made += [f"expert-{e}" for e in experts if self._ensure(self.expert_file(e))]
        return made

    def add_expert(self, expert: str) -> bool:
        """A seed for one more expert; False if it had one."""
        self.init()
        return self._ensure(self.expert_file(expert))

    def add_client(self, name: str) -> bool:
        """A seed for one more client user, ``client-<name>``: a client with an inbox of its own,
        which other clients cannot read (the shared ``client`` user's processes can read each
        other's). False if it had one."""
        self.init()
        return self._ensure(self.seed_file(f"client-{check_token('client name', name)}"))

    def _ensure(self, path: Path) -> bool:
        if path.exists():
            return False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_seed() + "\n")
        return True

    def auth(self, role: str) -> NatsAuth:
        """What a process of this role connects with."""
        return NatsAuth(nkey=self.seed_file(role))

    def authorization(
        self, prefix: str = DEFAULT_PREFIX, *, superusers: Mapping[str, str] | None = None
    ) -> str:
        """The nats-server ``authorization`` block: one nkey user per role with its permissions,
        and ``superusers`` (user -> password, every subject: the tests' one user) if given."""
        lines = ["authorization {", "  users: ["]
        for role in self.roles():
            key = public_key(read_seed(self.seed_file(role)))
            perms = role_permissions(role, f"{INBOX}.{key}", prefix).render()
            lines.append(f'    {{nkey: "{key}", permissions: {perms}}}  # {role}')
        for user, password in (superusers or {}).items():
            lines.append(f'    {{user: "{user}", password: "{password}"}}  # every subject')
        lines += ["  ]", "}"]
        return "\n".join(lines) + "\n"

    def write_authorization(
        self, prefix: str = DEFAULT_PREFIX, *, superusers: Mapping[str, str] | None = None
    ) -> Path:
        """Write ``authorization.conf`` (0600), which the server's config includes."""
        path = self.path / "authorization.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.authorization(prefix, superusers=superusers))
        return path

    @property
    def pid_file(self) -> Path:
        """Where ``moe2 server`` writes its nats-server's pid."""
        return self.path / "nats-server.pid"

    def reload_server(self) -> int | None:
        """SIGHUP the nats-server of this set-up if one runs: it re-reads its users. Its pid."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError):
            return None
        return pid

    def env_lines(self, role: str) -> str:
        """``MOE2_NATS_NKEY=...`` for a role, as a shell line."""
        return f"{ENV['nkey']}={self.seed_file(role)}"


def default_auth_dir() -> Path:
    """Where ``moe2 server`` and ``moe2 auth`` keep a local set-up: ``$MOE2_AUTH_DIR`` or
    ``~/.config/moe2/nats``."""
    env = os.environ.get("MOE2_AUTH_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "moe2" / "nats"
