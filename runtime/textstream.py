"""Incremental detokenization that only ever emits whole characters, and stop-string handling.

``Detokenizer.push(id)`` returns the new text a token completes. Byte-level BPE splits multi-byte characters
across tokens; a partial character decodes to U+FFFD, so the text is held back until the character is
complete. Decoding a short window that starts a few tokens back (``prefix``) keeps the decoders that strip or
add a leading space honest. Tokens that decode to nothing (special tokens, skipped) never enter the window,
and more than ``MAX_PENDING`` held-back tokens are let go (their bytes are not a character), so the window
stays a few tokens long whatever the model emits.

``StopText`` holds back text that might be the start of a stop string. It keeps, per stop string, the length
of the longest suffix of the text that is a prefix of that stop (a Knuth-Morris-Pratt automaton), so each new
character costs O(1) amortized per stop string, whatever the stop strings' length.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
MAX_PENDING = 8  # a UTF-8 character is at most 4 bytes, so at most 4 byte tokens


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
        token_id = int(token_id)
        if self.skip and self._decode([token_id]) == "":  # a special token: contributes no text
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        grew = len(now) > len(before)
        if (grew and not now.endswith(REPLACEMENT)) or len(self.ids) - self.read > MAX_PENDING:
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):] if grew else ""
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes to U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


def _failure(s: str) -> list[int]:
    """KMP failure function: f[i] = length of the longest proper prefix of s[:i+1] that is also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopText:
    """Accumulates text; ``feed`` returns what is safe to emit and whether a stop string was hit.

    The text stops at the first stop string to complete (the one ending earliest; of those ending at the same
    character, the longest), the same however the text is split into deltas.
    """

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # per stop: matched prefix length at the end of the text
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _advance(self, j: int, c: str) -> int:
        s, f, k = self.stops[j], self._fail[j], self._state[j]
        if k == len(s):
            k = f[k - 1]
        while k and s[k] != c:
            k = f[k - 1]
        if s[k] == c:
            k += 1
        self._state[j] = k
        return k

    def feed(self, delta: str) -> str:
        if self.stopped or not delta:
            return ""
        if not self.stops:
            self.text += delta
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out
        base = len(self.text)
        self.text += delta
        for i, c in enumerate(delta):
            hit = 0
            for j in range(len(self.stops)):
                k = self._advance(j, c)
                if k == len(self.stops[j]) and k > hit:
                    hit = k
            if hit:
                cut = base + i + 1 - hit
                self.stopped = True
                out = self.text[self.emitted:cut]
                self.text, self.emitted = self.text[:cut], cut
                return out
        safe = len(self.text) - max(self._state)  # the longest suffix that begins a stop string stays held
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def finish(self) -> str:
        """The held-back rest, at the end of generation (no stop string completed)."""
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
