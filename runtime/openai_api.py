"""OpenAI request validation for /v1/completions and /v1/chat/completions (responses: ``openai_shapes``).

Every field is checked for its type (booleans are booleans, numbers finite) and range before anything is
tokenized; text longer than the context could hold at the tokenizer's longest token is refused unread.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import EngineError
from .generate import GenerationConfig
from .http_guard import HttpError
from .sampling import SamplingParams
from .tokenizer import check_messages

MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 5  # completions: top tokens per position (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat
MAX_SEED = 2 ** 63 - 1


class BadRequest(HttpError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(400, message, code, param)


@dataclass(frozen=True)
class Limits:
    """What the served model and the server's flags allow a request."""
    model: str  # the served model's name; any other 'model' is 404
    context: int
    max_prompt_chars: int  # text beyond this cannot fit the context, whatever it tokenizes to
    default_max_tokens: int = 256  # chat, when a request gives none (completions use OpenAI's 16)
    max_tokens_cap: int | None = None


@dataclass
class Parsed:
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool
    model: str
    echo: bool = False
    prompt_text: str | None = None  # completions: the prompt as text (echo, text offsets)
    top_logprobs: int | None = None  # chat: logprobs asked for, with this many alternatives


def _num(body, name, lo=None, hi=None, default=None, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise BadRequest(f"'{name}' must be in {rng}, got {v}", name, "invalid_value")
    return float(v)


def _int(body, name, default=None, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo}"
        raise BadRequest(f"'{name}' must be {bound}, got {v}", name, "invalid_value")
    return v


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"'{name}' must be a boolean (true or false), got {type(v).__name__}", name,
                         "invalid_type")
    return v


def _too_long(n: int, unit: str, lim: Limits, param: str):
    return BadRequest(f"this model's maximum context length is {lim.context} tokens, but the prompt has "
                      f"{n} {unit}", param, "context_length_exceeded")


def _prompt(body, engine, chat: bool, lim: Limits) -> tuple[list[int], str | None]:
    """(token ids, prompt text for completions)."""
    if chat:
        messages = body.get("messages")
        if messages is None:
            raise BadRequest("'messages' is required", "messages", "missing")
        try:
            check_messages(messages)
        except EngineError as e:
            raise BadRequest(str(e), "messages", "invalid_type") from None
        if sum(len(m["content"]) for m in messages) > lim.max_prompt_chars:
            raise _too_long(sum(len(m["content"]) for m in messages), "characters (more than it can hold)",
                            lim, "messages")
        try:
            text = engine.tokenizer.apply_chat_template(messages)
        except EngineError as e:
            raise BadRequest(str(e), "messages") from None
        if len(text) > lim.max_prompt_chars:
            raise _too_long(len(text), "characters (more than it can hold)", lim, "messages")
        return engine.tokenizer.encode(text, add_special_tokens=False), None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if len(prompt) > lim.max_prompt_chars:
            raise _too_long(len(prompt), "characters (more than it can hold)", lim, "prompt")
        return engine.tokenizer.encode(prompt), prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if len(prompt) >= lim.context:
            raise _too_long(len(prompt), "tokens", lim, "prompt")
        try:
            return engine.encode_prompt(prompt), None
        except EngineError as e:
            raise BadRequest(str(e), "prompt", "invalid_value") from None
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise BadRequest("one prompt per request: send a string or a list of token ids", "prompt",
                         "unsupported")
    raise BadRequest("'prompt' must be a string, a list with one string, or a list of token ids", "prompt",
                     "invalid_type")


def _stop(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"'stop' must be a string or a list of up to {MAX_STOPS} strings", "stop", "invalid_type")
    long = [s for s in stop if len(s) > MAX_STOP_CHARS]
    if long:
        raise BadRequest(f"each stop string may have at most {MAX_STOP_CHARS} characters, got {len(long[0])}",
                         "stop", "invalid_value")
    return tuple(stop)


def _logprobs(body, chat: bool, stream: bool) -> tuple[int | None, bool, int | None]:
    """(logprobs k for generated tokens, echo, top_logprobs for chat)."""
    if chat:
        if body.get("echo") is not None and _bool(body, "echo"):
            raise BadRequest("'echo' is a /v1/completions option", "echo", "unsupported")
        want = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        return (top or 0) if want else None, False, (top or 0) if want else None
    k = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = _bool(body, "echo")
    if echo and stream:
        raise BadRequest("'echo' is not supported with 'stream': true", "echo", "unsupported")
    return k, echo, None


def _max_tokens(body, chat: bool, n_prompt: int, lim: Limits) -> int:
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    v = _int(body, key, None, 0)
    ctx = lim.context
    if v is None:
        v = min(lim.default_max_tokens if chat else 16, ctx - n_prompt)
        if lim.max_tokens_cap is not None:
            v = min(v, lim.max_tokens_cap)
    elif lim.max_tokens_cap is not None and v > lim.max_tokens_cap:
        raise BadRequest(f"'{key}' is {v}; this server generates at most {lim.max_tokens_cap} tokens a request",
                         key, "max_tokens_exceeded")
    if n_prompt + v > ctx:
        raise BadRequest(f"this model's maximum context length is {ctx} tokens, but you requested "
                         f"{n_prompt + v} ({n_prompt} in the prompt, {v} to generate)", key,
                         "context_length_exceeded")
    return v


def parse(body, engine, chat: bool, lim: Limits) -> Parsed:
    """Validate an OpenAI request body against the engine; raise BadRequest (or a 404 HttpError for another
    model) naming the offending param."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model", lim.model)
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model", "invalid_type")
    if model != lim.model:
        raise HttpError(404, f"the model {model[:100]!r} does not exist; this server serves {lim.model!r}",
                        "model_not_found", "model")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _bool(opts or {}, "include_usage")
    if _int(body, "n", 1, 1) != 1:
        raise BadRequest("only n=1 is supported", "n", "invalid_value")
    if not chat and _int(body, "best_of", 1, 1) != 1:
        raise BadRequest("only best_of=1 is supported", "best_of", "invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise BadRequest(f"'{name}' is not supported (use repetition_penalty)", name, "unsupported")
    if body.get("logit_bias"):
        raise BadRequest("'logit_bias' is not supported", "logit_bias", "unsupported")
    k, echo, top = _logprobs(body, chat, stream)
    stop = _stop(body)
    seed = _int(body, "seed", None, 0, MAX_SEED)
    ignore_eos = _bool(body, "ignore_eos")
    try:
        sp = SamplingParams(temperature=_num(body, "temperature", 0.0, 2.0, 1.0),
                            top_p=_num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
                            top_k=_int(body, "top_k", 0, 0),
                            repetition_penalty=_num(body, "repetition_penalty", 0.0, None, 1.0, lo_open=True))
    except BadRequest:
        raise
    except EngineError as e:
        raise BadRequest(str(e)) from None

    ids, text = _prompt(body, engine, chat, lim)
    param = "messages" if chat else "prompt"
    if not ids:
        raise BadRequest("the prompt is empty", param, "invalid_value")
    if len(ids) >= lim.context:
        raise _too_long(len(ids), "tokens", lim, param)
    max_tokens = _max_tokens(body, chat, len(ids), lim)
    try:
        cfg = GenerationConfig(max_new_tokens=max_tokens, sampling=sp, stop=stop, seed=seed, ignore_eos=ignore_eos,
                               logprobs=k, prompt_logprobs=k if echo else None)
    except EngineError as e:
        raise BadRequest(str(e)) from None
    if not chat and text is None and (echo or k is not None):
        text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    return Parsed(ids, cfg, stream, include_usage, model, echo, text, top)
