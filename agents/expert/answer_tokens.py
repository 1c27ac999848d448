"""An answer's tokens in an expert's own vocabulary, made from the answer's bytes.

In a session fused by bytes (docs/protocol.md §5, §7) a ``Step`` carries the chosen text, not an
id of this expert's vocabulary. The expert keeps the answer's bytes and tokenises them again
after each step, the same way for every step: so its history is always what its tokenizer makes
of the committed text, however the pool cut that text into candidates.

- Valid UTF-8 goes through the tokenizer's plain ``encode`` (no special tokens), and the result
  is kept only if its pieces give back exactly those bytes. A tokenizer that changes the text
  (a dummy-prefix space, a normaliser) gets a greedy longest match over its token bytes instead.
- Bytes that are not (yet) UTF-8 — half a character whose rest is still to come, or an invalid
  sequence — become single-byte tokens (byte-level BPE has one for every byte; sentencepiece
  its ``<0xNN>`` byte fallback). Once the character is complete, the next tokenisation encodes
  it as text, and the expert rolls its cache back over the byte tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

from moe2.runtime.errors import ErrorCode, Moe2Error


def utf8_runs(data: bytes) -> list[str | bytes]:
    """``data`` cut into runs of valid UTF-8 (str) and of bytes that are no character (bytes)."""
    runs: list[str | bytes] = []
    while data:
        try:
            runs.append(data.decode())
            break
        except UnicodeDecodeError as exc:
            if exc.start:
                runs.append(data[: exc.start].decode())
            runs.append(data[exc.start : exc.end])
            data = data[exc.end :]
    return runs


class AnswerTokenizer:
    """Bytes -> this vocabulary's ids, whose pieces concatenate back to exactly those bytes."""

    def __init__(self, encode: Callable[[str], list[int]], token_bytes: Sequence[bytes]) -> None:
        self._encode = encode
        self._pieces = token_bytes

    def ids(self, data: bytes) -> list[int]:
        out: list[int] = []
        for run in utf8_runs(data):
            out += self._text_ids(run) if isinstance(run, str) else self._longest_match(run)
        return out

    def bytes_of(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._pieces[i] for i in ids)

    def _text_ids(self, text: str) -> list[int]:
        ids = [int(i) for i in self._encode(text)]
        return ids if self.bytes_of(ids) == text.encode() else self._longest_match(text.encode())

    @cached_property
    def _index(self) -> tuple[dict[bytes, int], int]:
        """Piece -> the first id with it (empty pieces left out), and the longest piece."""
        index: dict[bytes, int] = {}
        for token, piece in enumerate(self._pieces):
            if piece:
                index.setdefault(piece, token)
        return index, max(map(len, index), default=0)

    def _longest_match(self, data: bytes) -> list[int]:
        index, longest = self._index
        out: list[int] = []
        at = 0
        while at < len(data):
            for size in range(min(longest, len(data) - at), 0, -1):
                token = index.get(data[at : at + size])
                if token is not None:
                    out.append(token)
                    at += size
                    break
            else:
                raise Moe2Error(
                    ErrorCode.INVALID_FIELD,
                    f"no token of this vocabulary holds the byte 0x{data[at]:02x}",
                )
        return out
