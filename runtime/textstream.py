"""Incremental detokenization that only ever emits whole characters, and stop-string handling.

``Detokenizer.push(id)`` returns the new text a token completes. Byte-level BPE splits multi-byte characters
across tokens; a partial character decodes to U+FFFD, so the text is held back until the character is
complete. Decoding a short window that starts a few tokens back (``prefix``) keeps the decoders that strip or
add a leading space honest. ``StopText`` holds back text that might be the start of a stop string.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this were already emitted

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes to U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


class StopText:
    """Accumulates text; ``feed`` returns what is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped or not delta:
            return ""
        self.text += delta
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out
        start = max(0, self.emitted - self.longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.stopped = True
            out = self.text[self.emitted:cut]
            self.text, self.emitted = self.text[:cut], cut
            return out
        safe = len(self.text)
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):  # a suffix that begins a stop string
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                safe = len(self.text) - k
                break
        out = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return out

    def finish(self) -> str:
        """The held-back rest, at the end of generation (no stop string completed)."""
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
