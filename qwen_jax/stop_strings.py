"""Stop strings across token boundaries.

Generated text arrives as deltas that can split a stop string anywhere ("<|im" + "_end|>").
`StopStringMatcher` emits only text that can no longer become part of a stop string: the longest
tail of the pending text that is a prefix of some stop string is held back until the next delta
decides it. The text ends where the first stop string to complete begins (or, with `include`,
where it ends: vLLM's include_stop_str_in_output); everything after it is never emitted.

Why holding back the longest such tail is enough: if a stop string started inside already-emitted
text, the emitted part of it would have been a tail of the emitted text that is a prefix of that
stop string, and that tail would have been held back. So the first stop string to complete always
lies in the pending buffer, where `push` looks for it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Incremental matcher: `push` deltas, emit what it returns, `flush` at the end."""

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        # Empty stop strings would match before any text; the request validator rejects them,
        # here they are simply ignored.
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self.include = include
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text_delta: str, match: bool = True) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit now, whether a stop string was hit).

        match False: stop strings may not end in this text (vLLM's min_tokens), but a tail of
        it that could begin one is still held back, for the text pushed next to complete."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text_delta, False
        old, text = len(self._pending), self._pending + text_delta
        # The stop that completes first ends the text (ties: the one starting first). Generation
        # cannot know about a longer stop that would complete later, so "first" means first to
        # end; this also makes the result independent of how the text was split into deltas.
        # A stop ending in the held-back text (pushed with match False) does not count.
        hits = [(i + len(s), i, s) for s in self.stops
                if match and (i := text.find(s, max(0, old - len(s) + 1))) >= 0]
        if hits:
            end, start, self.matched = min(hits)
            self._pending = ""
            self.stopped = True
            return text[: end if self.include else start], True
        hold = self._held_tail_length(text)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back text, released: generation ended without hitting a stop string, or
        what comes next cannot continue one (tool-call markup, which stops are not matched in).
        Matching goes on with the text pushed after it."""
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    def _held_tail_length(self, text: str) -> int:
        # Longest tail of `text` that a stop string starts with (a full match was ruled out).
        for n in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[len(text) - n :]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
