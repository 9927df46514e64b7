"""`kiln run`, `kiln chat`, `kiln bench`, `kiln serve`: the runtime on an onnx or engine artifact."""
from __future__ import annotations

import sys

import click

from .common import emit_json, stderr


def _engine_options(f):
    f = click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
                     show_default=True, help="What runs the model.")(f)
    f = click.option("--threads", type=click.IntRange(1, 1024), default=None,
                     help="Intra-op threads (default: the backend's choice).")(f)
    f = click.option("--trust-engine-code", is_flag=True,
                     help="Let a TensorRT engine built --version-compatible run the native code its plan "
                          "carries. Only for engines you built or trust.")(f)
    return f


def _sampling_options(f):
    f = click.option("--max-new-tokens", type=click.IntRange(1, None), default=256, show_default=True)(f)
    f = click.option("--temperature", type=click.FloatRange(0, None), default=None,
                     help="0 is greedy (default: generation_config.json, else greedy).")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)(f)
    f = click.option("--top-k", type=click.IntRange(0, None), default=None, help="0 disables top-k.")(f)
    f = click.option("--repetition-penalty", type=click.FloatRange(0, None, min_open=True), default=None)(f)
    f = click.option("--stop", multiple=True, help="Stop before this string (repeatable).")(f)
    f = click.option("--seed", type=int, default=None, help="Seed for sampling.")(f)
    return f


def _load(art, backend, threads, trust_engine_code=False):
    from runtime import Engine

    return Engine.load(art, backend=backend, threads=threads, trust_engine_code=trust_engine_code)


def _gen_kw(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, ignore_eos=False):
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                repetition_penalty=repetition_penalty, stop=list(stop), seed=seed, ignore_eos=ignore_eos)


@click.command("run")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@_sampling_options
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--chat", "as_chat", is_flag=True, help="Send PROMPT as a user message through the chat template.")
@_engine_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, tokens, timings) instead.")
def run(art, prompt, max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, ignore_eos,
        as_chat, backend, threads, trust_engine_code, as_json):
    """Continue PROMPT with the model of artifact ART, streaming the text to the terminal."""
    eng = _load(art, backend, threads, trust_engine_code)
    p = [{"role": "user", "content": prompt}] if as_chat else prompt
    kw = _gen_kw(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, ignore_eos)
    if as_json:
        r = eng.generate(p, **kw)
        emit_json({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                   "timings": r.timings})
        return
    for delta in eng.stream(p, **kw):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = eng.last_results[0]
    t = r.timings
    rate = f", {t['decode_tokens_per_s']:.1f} tok/s" if "decode_tokens_per_s" in t else ""
    stderr(f"[{t['completion_tokens']} tokens, first after {1e3 * t['ttft_s']:.0f} ms{rate}, "
           f"finish: {r.finish_reason}]")


@click.command("chat")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--system", default=None, help="A system message to start the conversation with.")
@_sampling_options
@_engine_options
def chat(art, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, backend,
         threads, trust_engine_code):
    """Talk to the model of ART with its chat template. /reset clears the history, /exit (or Ctrl-D) quits."""
    eng = _load(art, backend, threads, trust_engine_code)
    if eng.tokenizer.chat_template is None:
        from runtime.errors import EngineError

        raise EngineError(f"{art} has no chat template; use `kiln run` with a plain prompt")
    kw = _gen_kw(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        pieces = []
        for delta in eng.stream(history, **kw):
            pieces.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces)})


@click.command("bench")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt-len", type=click.IntRange(1, None), default=32, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2, None), default=128, show_default=True)
@click.option("--prefill-len", type=click.IntRange(1, None), default=512, show_default=True,
              help="Prompt length for the prefill / time-to-first-token measurement.")
@click.option("--runs", type=click.IntRange(1, None), default=5, show_default=True)
@_engine_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object last on stdout.")
def bench(art, prompt_len, new_tokens, prefill_len, runs, backend, threads, trust_engine_code, as_json):
    """Decode tokens/s, time to first token, prefill ms and peak RSS of ART at batch 1 (greedy, medians)."""
    from runtime.bench import BenchConfig, benchmark
    from runtime.progress import bar

    cfg = BenchConfig(prompt_len=prompt_len, new_tokens=new_tokens, runs=runs, prefill_len=prefill_len)
    eng = _load(art, backend, threads, trust_engine_code)
    b = bar(cfg.runs + cfg.warmup, "bench") if not as_json and sys.stderr.isatty() else None
    try:
        res = benchmark(eng, cfg, progress=b.advance if b else None)
    finally:
        if b:
            b.close()
    if as_json:
        emit_json(res)
        return
    click.echo(f"decode        {res['decode_tokens_per_s']:.1f} tokens/s  (prompt {prompt_len}, {new_tokens} new, "
               f"median of {runs})")
    click.echo(f"first token   {res['ttft_ms']:.1f} ms")
    click.echo(f"prefill       {res['prefill_ms']:.1f} ms for {prefill_len} tokens")
    click.echo(f"peak RSS      {res['peak_rss_mb']:.0f} MiB")
    click.echo(f"backend       {res['backend']}, threads {res.get('threads')}")


def _min_max(ctx, param, value):
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise click.BadParameter(f"expected MIN:MAX (two whole numbers), got {value!r}")
    return int(lo), int(hi)


@click.command("serve")
@click.argument("art", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (loopback unless you say otherwise).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--api-key", default=None, envvar="KILN_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (or set KILN_API_KEY).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Requests decoded together.")
@click.option("--max-queue", type=click.IntRange(0, None), default=64, show_default=True,
              help="Requests waiting for a batch slot before new ones get 429.")
@click.option("--model-name", default=None, help="The model id /v1/models reports and requests must name "
              "(default: the source model).")
@click.option("--kv-budget-mb", type=click.FloatRange(0, None, min_open=True), default=None,
              help="KV cache the running requests may take; beyond it requests wait in the queue "
                   "(default: half of MemAvailable at start).")
@click.option("--max-tokens-cap", type=click.IntRange(1, None), default=4096, show_default=True,
              help="The most tokens one request may ask for (a larger max_tokens is a 400).")
@click.option("--default-max-tokens", type=click.IntRange(1, None), default=256, show_default=True,
              help="Chat tokens when a request gives no max_tokens (completions use 16, as OpenAI).")
@click.option("--max-body-mb", type=click.FloatRange(0, None, min_open=True), default=4.0, show_default=True,
              help="Largest request body; beyond it 413.")
@click.option("--body-timeout", type=click.FloatRange(0, None, min_open=True), default=30.0, show_default=True,
              help="Seconds a request body may take to arrive; beyond it 408.")
@click.option("--max-connections", type=click.IntRange(1, None), default=128, show_default=True,
              help="Concurrent connections; beyond them 503.")
@_engine_options
@click.option("--replicas", type=click.IntRange(1, 1024), default=None,
              help="Serve ART as this many Ray Serve replicas (needs llmkiln[ray]; --threads, --max-batch, "
                   "--max-queue and --kv-budget-mb are then per replica). See docs/SCALE_OUT.md.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --replicas: join this Ray cluster (ART must be at the same path on every node) "
                   "instead of starting a local Ray on 127.0.0.1.")
@click.option("--autoscale", default=None, metavar="MIN:MAX", callback=_min_max,
              help="With --replicas: scale between MIN and MAX replicas on ongoing requests per replica.")
def serve(art, host, port, api_key, max_batch, max_queue, model_name, kv_budget_mb, max_tokens_cap,
          default_max_tokens, max_body_mb, body_timeout, max_connections, backend, threads, trust_engine_code,
          replicas, ray_address, autoscale):
    """OpenAI-compatible HTTP server for ART: /v1/models, /v1/completions, /v1/chat/completions
    (stream: true as server-sent events; logprobs, echo), /health, /metrics."""
    from runtime.server import ServerConfig, serve as run_server

    cfg = ServerConfig(host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                       model_name=model_name, kv_budget_mb=kv_budget_mb, max_tokens_cap=max_tokens_cap,
                       default_max_tokens=default_max_tokens, max_body_mb=max_body_mb,
                       body_timeout_s=body_timeout, max_connections=max_connections)
    if replicas is None:
        if ray_address or autoscale:
            raise click.UsageError("--ray-address and --autoscale go with --replicas N")
        eng = _load(art, backend, threads, trust_engine_code)
        run_server(eng, cfg, on_ready=lambda url: stderr(f"serving {art} at {url}/v1 (Ctrl-C stops)"))
        return
    from runtime.ray_serve import ReplicaOptions, serve_replicated

    opts = ReplicaOptions(replicas=replicas, autoscale=autoscale, ray_address=ray_address, threads=threads,
                          backend=backend, trust_engine_code=trust_engine_code)
    n = f"{autoscale[0]}..{autoscale[1]}" if autoscale else str(replicas)
    serve_replicated(art, cfg, opts, say=stderr,
                     on_ready=lambda url: stderr(f"serving {art} ({n} replicas) at {url}/v1 (Ctrl-C stops)"))


COMMANDS = [run, chat, bench, serve]
