"""OpenAI response bodies: full responses, stream chunks, usage, logprobs objects and error bodies."""
from __future__ import annotations

import time
import uuid


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(seq) -> dict:
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.out),
            "total_tokens": len(seq.prompt) + len(seq.out)}


def finish_reason(seq) -> str:
    """OpenAI's values: "stop" (EOS or a stop string) or "length" (max_tokens reached)."""
    return seq.finish_reason if seq.finish_reason in ("stop", "length") else "stop"


class TokenText:
    """Token id -> its text (special tokens included), cached per id."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = self.tok.decode([i], skip_special_tokens=False)
        return s


def completion_logprobs(entries, text: TokenText, offset: int) -> dict:
    """The /v1/completions ``logprobs`` object for ``entries`` (TokenLogprob, or None for a first prompt
    token given as ``(None, id)``): top k plus the chosen token, as OpenAI does; offsets from ``offset``."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        if isinstance(e, tuple):  # (None, token id): no logprob
            tok = e[1]
            out["tokens"].append(text(tok))
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            tok = e.token
            out["tokens"].append(text(tok))
            out["token_logprobs"].append(e.logprob)
            top: dict[str, float] = {}
            for i, lp in e.top:  # two ids with the same text (byte tokens read as U+FFFD): the likelier stays
                top.setdefault(text(i), lp)
            top.setdefault(text(tok), e.logprob)
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text(tok))
    return out


def _entry(i: int, lp: float, text: TokenText) -> dict:
    s = text(i)
    return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", errors="replace"))}


def chat_logprobs(entries, text: TokenText) -> dict:
    return {"content": [dict(_entry(e.token, e.logprob, text), top_logprobs=[_entry(i, lp, text) for i, lp in e.top])
                        for e in entries], "refusal": None}


def prompt_entries(seq) -> list:
    """The prompt's logprob entries with the first token as (None, id)."""
    lps = seq.prompt_logprobs or []
    return [(None, seq.prompt[0])] + list(lps[1:])


def full_response(rid: str, chat: bool, model: str, seq, p, text: TokenText) -> dict:
    """The non-streaming body; ``p`` is the request's ``Parsed``."""
    reason = finish_reason(seq)
    if chat:
        lp = chat_logprobs(seq.logprobs, text) if p.top_logprobs is not None else None
        choice = {"index": 0, "message": {"role": "assistant", "content": seq.text}, "logprobs": lp,
                  "finish_reason": reason}
    else:
        body = (p.prompt_text or "") + seq.text if p.echo else seq.text
        lp = None
        if p.config.logprobs is not None:
            entries = (prompt_entries(seq) if p.echo else []) + list(seq.logprobs)
            lp = completion_logprobs(entries, text, 0 if p.echo else len(p.prompt_text or ""))
        choice = {"index": 0, "text": body, "logprobs": lp, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(seq)}


def chunk(rid: str, chat: bool, model: str, text: str | None = None, finish: str | None = None,
          role: bool = False, usage_: dict | None = None, logprobs: dict | None = None) -> dict:
    if usage_ is not None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
