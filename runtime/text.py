"""Turning chosen tokens' bytes into streamed text, with stop strings held back until certain."""

from __future__ import annotations

import codecs


class TextAssembler:
    """Accumulates token bytes; ``push`` returns the text that is now safe to stream."""

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The whole answer so far, cut at a stop string if one was seen."""
        return self._text

    def push(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        self._text += self._decoder.decode(piece)
        for s in self._stop:
            at = self._text.find(s)
            if at >= 0:
                self._text = self._text[:at]
                self.stopped = True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        end = len(self._text) if final else len(self._text) - self._held_back()
        delta = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix that could still grow into a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), 0, -1):
                if self._text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest
