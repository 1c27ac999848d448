"""Turning chosen tokens' bytes into streamed text, with stop strings held back until certain.

Each stop string has a Knuth–Morris–Pratt matcher that knows how long a prefix of it the text
ends with, so a token costs O(stops × its own characters), whatever the answer's length or the
stop strings' lengths (docs/protocol.md §9).
"""

from __future__ import annotations

import codecs


class StopMatcher:
    """How much of one stop string the text fed so far ends with (KMP)."""

    def __init__(self, stop: str) -> None:
        if not stop:
            raise ValueError("a stop string must not be empty")
        self.stop = stop
        self.matched = 0  # the longest prefix of ``stop`` that is a suffix of the text
        self._fallback = _failure_table(stop)

    def feed(self, text: str) -> int | None:
        """Feed ``text``; the offset in it just past the first full match, or None."""
        stop, fallback, k = self.stop, self._fallback, self.matched
        for i, ch in enumerate(text):
            while k and stop[k] != ch:
                k = fallback[k - 1]
            if stop[k] == ch:
                k += 1
            if k == len(stop):
                self.matched = fallback[k - 1]
                return i + 1
        self.matched = k
        return None


def _failure_table(s: str) -> list[int]:
    """``table[i]``: the longest proper prefix of ``s[: i + 1]`` that is also its suffix."""
    table = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[k] != s[i]:
            k = table[k - 1]
        if s[k] == s[i]:
            k += 1
        table[i] = k
    return table


class TextAssembler:
    """Accumulates token bytes; ``push`` returns the text that is now safe to stream."""

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matchers = [StopMatcher(s) for s in stop if s]
        self._released: list[str] = []  # text already handed out
        self._held = ""  # decoded text not handed out yet: it could begin a stop string
        self.stopped = False

    @property
    def text(self) -> str:
        """The whole answer so far, cut at a stop string if one was seen."""
        return "".join(self._released) + self._held

    def push(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        new = self._decoder.decode(piece)
        if not new:
            return ""
        buffer = self._held + new
        cut = self._first_stop(new, len(buffer) - len(new))
        if cut is not None:
            self.stopped = True
            return self._release(buffer[:cut], "")
        hold = max((m.matched for m in self._matchers), default=0)
        return self._release(buffer[: len(buffer) - hold], buffer[len(buffer) - hold :])

    def finish(self) -> str:
        """The rest of the text once no token follows (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(b"", final=True), "")

    def _first_stop(self, new: str, offset: int) -> int | None:
        """Where the answer ends if ``new`` completes a stop string: the earliest start of one."""
        starts = [
            offset + end - len(m.stop) for m in self._matchers if (end := m.feed(new)) is not None
        ]
        return min(starts, default=None)

    def _release(self, out: str, held: str) -> str:
        self._held = held
        if out:
            self._released.append(out)
        return out
