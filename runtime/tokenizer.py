"""Tokenizer (the `tokenizers` library) and chat template (jinja2), read from an artifact dir; no transformers.

Files: ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens, ``chat_template``),
``chat_template.jinja`` / ``chat_template.json`` (where newer writers keep the template),
``generation_config.json`` (EOS ids, sampling defaults).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import EngineError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _load_template(root: Path, config: dict) -> str | None:
    t = config.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if isinstance(t, str):
        return t
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    t = _read_json(root / "chat_template.json").get("chat_template")
    return t if isinstance(t, str) else None


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``apply_chat_template(messages) -> str``."""

    def __init__(self, root: str | Path):
        from tokenizers import Tokenizer as _Tok

        root = Path(root)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise EngineError(f"{root}: tokenizer.json is missing; the artifact needs its tokenizer files "
                              "(re-export it, or copy tokenizer.json and tokenizer_config.json from the source model)")
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:
            raise EngineError(f"{path}: the tokenizers library cannot read it ({e})") from None
        self.config = _read_json(root / "tokenizer_config.json")
        self.chat_template = _load_template(root, self.config)
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        gen = _read_json(root / "generation_config.json")
        self.generation_config = gen
        eos = set()
        for v in (gen.get("eos_token_id"),):
            eos.update([v] if isinstance(v, int) else [x for x in (v or []) if isinstance(x, int)])
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_ids = frozenset(eos)
        self._template = None

    # ---- text <-> ids -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise EngineError(f"encode expects a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- chat -----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render ``messages`` the way transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
        if self.chat_template is None:
            raise EngineError("this model has no chat template (tokenizer_config.json has no chat_template); "
                              "pass a plain prompt string instead of messages")
        check_messages(messages)
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise TemplateError(msg)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(self.chat_template)
            except Exception as e:
                raise EngineError(f"the chat template does not parse: {e}") from None
        specials = {k: _token_str(v) for k, v in self.config.items() if k.endswith("_token")}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in specials.items() if v is not None}, **extra)
        except Exception as e:
            raise EngineError(f"the chat template failed on these messages: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # the template writes the special tokens itself, as transformers' apply_chat_template(tokenize=True)
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise EngineError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise EngineError(f"messages[{i}] must be an object with string 'role' and 'content'")
