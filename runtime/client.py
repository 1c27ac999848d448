"""The Python client.

``async with moe2.connect(url) as client: async for chunk in client.ask(...)``
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import nats.errors
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from moe2.runtime import wire
from moe2.runtime.auth import NatsAuth
from moe2.runtime.connection import close_nats, connect_nats
from moe2.runtime.errors import ErrorCode, Moe2Error, error_code
from moe2.runtime.subjects import DEFAULT_PREFIX, Subjects

log = structlog.get_logger("moe2.client")

NO_RESPONDER_RETRIES = 3
# docs/faults.md: a fusion agent of this version takes a prompt with an empty Moe2-Alive message
# at once and sends one whenever it sent nothing for a second
ALIVE_HEADER = "Moe2-Alive"
ALIVE_SUFFIX = ".alive"  # the prompt's reply subject ends so: keepalives asked for
FIRST_MESSAGE_S = 1.0  # no first message in this time: the prompt is asked again
# ... this many times. With one of two agents of a queue group stopped, each ask reaches it with
# probability 1/2: 8 retries left 1 question in 512 waiting out its whole timeout; 30, 1 in 2^31.
# Only a prompt that no agent took is asked again, and a session started twice is cancelled.
NOT_STARTED_RETRIES = 30
ALIVE_TIMEOUT_S = 2.5  # once keepalives came: silence this long is fusion_lost
ANSWER_BUFFER = 256  # messages of one answer queued between the subscription and the reader
PromptInput = str | Sequence[wire.ChatMessage] | Sequence[dict[str, str]]


def new_conversation() -> str:
    """A fresh conversation id (32 hex digits) for ``Client.ask(..., conversation=...)``."""
    return uuid.uuid4().hex


def to_messages(prompt: PromptInput) -> list[wire.ChatMessage]:
    if isinstance(prompt, str):
        return [wire.ChatMessage(role="user", content=prompt)]
    return [m if isinstance(m, wire.ChatMessage) else wire.ChatMessage(**m) for m in prompt]


class Answer:
    """The stream of one answer: iterate for chunks; ``final`` holds the summary afterwards.

    Leaving the iteration early (``break``, an exception, ``aclose()``) cancels the session: the
    client publishes a ``Cancel`` for it, and the fusion agent closes every expert.
    """

    def __init__(self, client: Client, prompt: wire.Prompt, timeout: float) -> None:
        self._client = client
        self._prompt = prompt
        self._timeout = timeout
        self.final: wire.Final | None = None
        self.chunks: list[wire.Chunk] = []
        self.session = ""  # fixed by the first message that names one
        self._ended = False  # a Final or an Error came: nothing left to cancel
        self._starts = 0  # the prompt asked again because no fusion agent took it
        self._duplicates: dict[str, bool] = {}  # sessions a prompt asked again also started:
        # cancelled once each (True: the Cancel went out)

    @property
    def text(self) -> str:
        return self.final.text if self.final else "".join(c.text for c in self.chunks)

    def __aiter__(self) -> AsyncIterator[wire.Chunk]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[wire.Chunk]:
        nc = self._client.nc
        send, inbox = anyio.create_memory_object_stream[Msg](ANSWER_BUFFER)

        async def deliver(msg: Msg) -> None:
            await send.send(msg)  # a slow reader slows the subscription, never loses text

        sub = await nc.subscribe(nc.new_inbox() + ALIVE_SUFFIX, cb=deliver)
        try:
            await self._client.publish_prompt(self._prompt, reply=sub.subject)
            retries = 0
            heard = alive = False  # any message of a fusion agent; a keepalive among them
            while self.final is None:
                msg = await self._next(inbox, heard, alive)
                if msg is None:  # no fusion agent took the prompt: ask another (docs/faults.md)
                    log.info("prompt_not_taken", retry=self._starts)
                    await self._client.publish_prompt(self._prompt, reply=sub.subject)
                    continue
                heard = True
                if msg.headers and ALIVE_HEADER in msg.headers:
                    alive = True
                    continue
                if _no_responders(msg) and retries < NO_RESPONDER_RETRIES:
                    # nats-server now and then answers 503 just as a subscriber appears, and
                    # a fusion agent may be restarting: ask again before giving up.
                    retries += 1
                    await anyio.sleep(0.05 * 2**retries)
                    await self._client.publish_prompt(self._prompt, reply=sub.subject)
                    continue
                item = self._read(msg)
                await self._cancel_duplicates()
                if isinstance(item, wire.Chunk):
                    self.chunks.append(item)
                    yield item
        finally:
            with anyio.CancelScope(shield=True):
                if not self._ended:
                    await self._cancel()
                await sub.unsubscribe()
                send.close()
                inbox.close()

    async def _cancel(self) -> None:
        """Tell the session's fusion agent to stop; before its id is known, the agent learns it
        from the server's no-responders answer to its next Chunk."""
        if self.session:
            await self._send_cancel(self.session, "client")

    async def _cancel_duplicates(self) -> None:
        """A prompt asked again (no first message in time) may have been taken twice: the
        sessions after the first to answer are cancelled, so they free their experts."""
        for session, sent in list(self._duplicates.items()):
            if not sent:
                self._duplicates[session] = True
                await self._send_cancel(session, "duplicate")

    async def _send_cancel(self, session: str, reason: str) -> None:
        cancel = wire.Cancel(session=session, reason=reason)
        try:
            await self._client.nc.publish(
                self._client.subjects.cancel(session), wire.encode(cancel)
            )
        except Exception as exc:  # the connection is gone: the agent sees no inbox either
            log.debug("cancel_not_sent", session=session, error=str(exc))

    async def _next(
        self, inbox: MemoryObjectReceiveStream[Msg], heard: bool, alive: bool
    ) -> Msg | None:
        """The next message; None when none came within ``FIRST_MESSAGE_S`` of the prompt (and
        it may be asked again). Raises ``fusion_lost`` when a fusion agent that sent keepalives
        fell silent, ``timeout`` after ``timeout`` s of silence otherwise."""
        limit = self._timeout
        if alive:
            limit = min(limit, ALIVE_TIMEOUT_S)
        elif not heard and self._starts < NOT_STARTED_RETRIES:
            limit = min(limit, FIRST_MESSAGE_S)
        waited_less = limit < self._timeout
        with anyio.move_on_after(limit):
            return await inbox.receive()
        if waited_less and alive:
            raise Moe2Error(
                ErrorCode.FUSION_LOST,
                f"the fusion agent serving this answer sent nothing for {limit:g}s: it stopped",
            )
        if waited_less and not heard:
            self._starts += 1
            return None
        raise Moe2Error(ErrorCode.TIMEOUT, f"no answer within {self._timeout}s of the last message")

    def _read(self, msg: Msg) -> wire.Chunk | None:
        if _no_responders(msg):
            raise Moe2Error(ErrorCode.NO_FUSION_AGENT, "no fusion agent listens on the bus")
        item = wire.decode(msg.data)
        if not isinstance(item, wire.Error | wire.Final | wire.Chunk):
            raise Moe2Error(
                ErrorCode.UNKNOWN_TYPE, f"unexpected {type(item).__name__} in an answer"
            )
        if not self._ours(item):
            return None
        if isinstance(item, wire.Error):
            self._ended = True
            raise Moe2Error(error_code(item.code), item.message)
        if isinstance(item, wire.Final):
            self._ended = True
            self.final = item
            return None
        return item

    def _ours(self, item: wire.Error | wire.Final | wire.Chunk) -> bool:
        """The first message that names a session fixes it; one of another session is ignored."""
        if not self.session:
            self.session = item.session
            return True
        if item.session == self.session:
            return True
        if self._starts and not isinstance(item, wire.Final | wire.Error):
            self._duplicates.setdefault(item.session, False)  # the prompt was taken twice
        log.warning(
            "foreign_message_ignored",
            type=type(item).__name__,
            session=item.session,
            expected=self.session,
        )
        return False

    async def collect(self) -> wire.Final:
        async for _ in self:
            pass
        assert self.final is not None, "the stream ends only with a final message"
        return self.final


def _no_responders(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get("Status") == "503"  # type: ignore[union-attr]


class Client:
    def __init__(self, nc: NATS, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.nc = nc
        self.subjects = Subjects(prefix)

    def ask(
        self,
        prompt: PromptInput,
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        experts: int | None = None,
        step_deadline_s: float | None = None,
        timeout: float = 60.0,
        conversation: str | None = None,
    ) -> Answer:
        """Ask the fusion agents; iterate the result for streamed chunks. ``step_deadline_s``
        overrides the agent's per-step deadline for this answer.

        ``conversation`` (``new_conversation()`` makes one): the prompt is a turn of that
        conversation, its whole history in ``prompt``; later turns go to the experts of the
        first while they are live, and each starts from the cache it kept of the earlier
        turns (docs/conversations.md). A bad id is ``invalid_field``.
        """
        if not wire.valid_conversation(conversation):
            raise Moe2Error(ErrorCode.INVALID_FIELD, wire.conversation_rule(str(conversation)))
        message = wire.Prompt(
            messages=to_messages(prompt),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            experts=experts,
            step_deadline_s=step_deadline_s,
            conversation=conversation,
        )
        return Answer(self, message, timeout)

    async def publish_prompt(self, prompt: wire.Prompt, *, reply: str) -> None:
        data = wire.encode(prompt)
        try:
            await self.nc.publish(self.subjects.prompt, data, reply=reply)
        except nats.errors.MaxPayloadError:
            raise Moe2Error(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"prompt of {len(data)} bytes is over the server's max_payload "
                f"({self.nc.max_payload} bytes)",
            ) from None


@asynccontextmanager
async def connect(
    url: str = "nats://127.0.0.1:4222",
    *,
    prefix: str = DEFAULT_PREFIX,
    name: str = "moe2-client",
    auth: NatsAuth | None = None,
) -> AsyncIterator[Client]:
    """A client on ``url``; ``auth``: its credentials and TLS (default: ``MOE2_NATS_*``)."""
    nc = await connect_nats(url, name=name, auth=auth)
    try:
        yield Client(nc, prefix=prefix)
    finally:
        await close_nats(nc)
