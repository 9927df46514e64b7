"""``Selection(targets, ignore)``: which modules a quantize or prune pass touches, in one pattern language.

A pattern is ``re:REGEX`` (full match on the torch module name) or a glob that matches the full name or its
last dotted components: ``down_proj``, ``self_attn.*``, ``model.layers.0.*``, ``lm_head``. ``ignore`` beats
``targets``. ``embed_tokens`` names the same table as a tied ``lm_head``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .errors import CompressError

DECODER_LINEARS = r"re:model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def check_patterns(patterns, what: str) -> tuple[str, ...]:
    """The patterns as a tuple of strings; a bad regular expression or a non-string is a CompressError."""
    if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
        raise CompressError(f"{what} must be a list of non-empty pattern strings, got {patterns!r}")
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise CompressError(f"{what} pattern {p!r} is not a valid regular expression ({e})") from None
    return tuple(patterns)


def matches(name: str, patterns) -> bool:
    """Whether module ``name`` is named by one of ``patterns`` (see the module doc)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatchcase(name, p) or fnmatchcase(name, "*." + p):
            return True
    return False


@dataclass(frozen=True)
class Selection:
    targets: tuple[str, ...] = (DECODER_LINEARS,)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "targets", check_patterns(self.targets, "targets"))
        object.__setattr__(self, "ignore", check_patterns(self.ignore, "ignore"))

    def __call__(self, name: str) -> bool:
        if name == "lm_head" and matches("model.embed_tokens", self.ignore):
            return False
        return matches(name, self.targets) and not matches(name, self.ignore)

    def pick(self, names, what: str = "Linear") -> list[str]:
        """The selected names, in order; none selected is an error naming the patterns."""
        out = [n for n in names if self(n)]
        if not out:
            raise CompressError(f"no {what} matches targets {list(self.targets)} minus ignore {list(self.ignore)}")
        return out
