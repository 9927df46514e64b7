"""OpenAI request validation and response shapes for /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .errors import EngineError
from .generate import GenerationConfig
from .sampling import SamplingParams
from .tokenizer import check_messages


class BadRequest(EngineError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _num(body, name, lo=None, hi=None, default=None, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise BadRequest(f"'{name}' must be in {rng}, got {v}", name, "invalid_value")
    return float(v)


def _int(body, name, default=None, lo=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
    if lo is not None and v < lo:
        raise BadRequest(f"'{name}' must be at least {lo}, got {v}", name, "invalid_value")
    return v


@dataclass
class Parsed:
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool
    model: str


def parse(body, engine, chat: bool, model_name: str, default_max_tokens: int) -> Parsed:
    """Validate an OpenAI request body against the engine; raise BadRequest with the offending param."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options", "invalid_type")
    n = _int(body, "n", 1)
    if n != 1:
        raise BadRequest("only n=1 is supported", "n", "invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise BadRequest(f"'{name}' is not supported (use repetition_penalty)", name, "unsupported")
    if body.get("logprobs") not in (None, False) or body.get("echo") not in (None, False):
        raise BadRequest("logprobs and echo are not supported", "logprobs", "unsupported")

    try:
        if chat:
            messages = body.get("messages")
            if messages is None:
                raise BadRequest("'messages' is required", "messages", "missing")
            try:
                check_messages(messages)
            except EngineError as e:
                raise BadRequest(str(e), "messages", "invalid_type") from None
            ids = engine.tokenizer.encode_chat(messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = engine.tokenizer.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
                ids = engine.encode_prompt(prompt)
            else:
                raise BadRequest("'prompt' must be a string, a list with one string, or a list of token ids",
                                 "prompt", "invalid_type")
    except BadRequest:
        raise
    except EngineError as e:
        raise BadRequest(str(e), "messages" if chat else "prompt") from None
    if not ids:
        raise BadRequest("the prompt is empty", "messages" if chat else "prompt", "invalid_value")

    ctx = engine.context_length
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, None)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"'{key}' must be at least 1, got {max_tokens}", key, "invalid_value")
    if len(ids) >= ctx:
        raise BadRequest(f"this model's maximum context length is {ctx} tokens, but the prompt has {len(ids)}",
                         "messages" if chat else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, ctx - len(ids))
    if len(ids) + max_tokens > ctx:
        raise BadRequest(f"this model's maximum context length is {ctx} tokens, but you requested "
                         f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
                         key, "context_length_exceeded")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) for s in stop)):
        raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop", "invalid_type")
    seed = _int(body, "seed", None)
    try:
        sp = SamplingParams(temperature=_num(body, "temperature", 0.0, 2.0, 1.0),
                            top_p=_num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
                            top_k=_int(body, "top_k", 0, lo=0),
                            repetition_penalty=_num(body, "repetition_penalty", 0.0, None, 1.0, lo_open=True))
        cfg = GenerationConfig(max_new_tokens=max_tokens, sampling=sp, stop=tuple(stop or ()), seed=seed,
                               ignore_eos=bool(body.get("ignore_eos", False)))
    except BadRequest:
        raise
    except EngineError as e:
        raise BadRequest(str(e)) from None
    return Parsed(ids, cfg, stream, bool(opts.get("include_usage", False)), model)


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(seq) -> dict:
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.out),
            "total_tokens": len(seq.prompt) + len(seq.out)}


def full_response(rid: str, chat: bool, model: str, seq) -> dict:
    reason = seq.finish_reason if seq.finish_reason in ("stop", "length") else "stop"
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": seq.text}, "logprobs": None,
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": seq.text, "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(seq)}


def chunk(rid: str, chat: bool, model: str, text: str | None = None, finish: str | None = None,
          role: bool = False, usage_: dict | None = None) -> dict:
    if usage_ is not None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
