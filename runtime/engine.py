"""``Engine``: load an artifact dir (kiln.json) and generate, stream or score. Never imports torch.

    from runtime import Engine
    eng = Engine.load("out/smollm2-int8")
    eng.generate("The capital of France is", max_new_tokens=16).text
    for delta in eng.stream([{"role": "user", "content": "Hi"}]): print(delta, end="")
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from .backends import load_backend
from .errors import EngineError
from .layerspec import summarize
from .generate import GenerationConfig, Result, Sequence, run_to_end, Batch
from .manifest import ManifestError, read_manifest, verify_files
from .onnx_files import check_artifact_files
from .fsutil import sha256_file
from .sampling import SamplingParams
from .tokenizer import Tokenizer

QUICK_HASH_LIMIT = 64 << 20  # quick verification hashes files up to this size, checks sizes of the rest
VERIFY = ("quick", "full", "none")


def _verify(root: Path, manifest, mode: str) -> None:
    if mode == "none":
        return
    verify_files(root, manifest, full=(mode == "full"))
    if mode == "quick":
        for name, meta in manifest.files.items():
            p = root / name
            if meta.size <= QUICK_HASH_LIMIT and sha256_file(p) != meta.sha256:
                raise ManifestError(f"{p}: sha256 differs from kiln.json; the file is corrupt or was edited — "
                                    "re-create the artifact")


def _is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


class Engine:
    def __init__(self, root: Path, manifest, backend, tokenizer: Tokenizer):
        self.root, self.manifest, self.backend, self.tokenizer = root, manifest, backend, tokenizer
        arch = manifest.architecture
        self.context_length = int(arch.max_position)
        eos = set(tokenizer.eos_ids)
        a_eos = arch.eos_token_id
        eos.update([a_eos] if isinstance(a_eos, int) else (a_eos or []))
        self.eos_ids = frozenset(eos)
        # one generate/stream/score at a time through this object (re-entrant: a stream consumer may call
        # generate); separate caches make concurrent use safe, serializing just avoids oversubscribing the CPU
        self._lock = threading.RLock()

    @property
    def model_name(self) -> str:
        """The source model's id (an alias, or the last part of its path), else the artifact dir's name."""
        sid = self.manifest.source.get("id") or self.manifest.source.get("model")
        return Path(str(sid)).name if sid else self.root.name

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None,
             providers: list[str] | None = None, verify: str = "quick", trust_engine_code: bool = False) -> Engine:
        """Read kiln.json, check the files (sizes, and sha256 of files up to 64 MiB; ``verify="full"``
        hashes all, ``"none"`` skips), load the tokenizer and the backend. ``trust_engine_code``: a TensorRT
        engine built --version-compatible carries native host code that runs when it loads; it is refused
        unless you pass True (only for engines you built or trust)."""
        root = Path(path)
        if verify not in VERIFY:
            raise EngineError(f"verify must be one of {', '.join(VERIFY)}, got {verify!r}")
        if not root.is_dir():
            raise EngineError(f"{root}: no such artifact directory")
        manifest = read_manifest(root)
        if manifest.kind == "checkpoint":
            raise EngineError(f"{root} is a checkpoint; the runtime runs onnx or engine artifacts "
                              f"(make one with `kiln export onnx {root} -o ART`)")
        check_artifact_files(root, manifest)  # every listed file a plain file inside the dir, before any is read
        _verify(root, manifest, verify)
        tok = Tokenizer(root)
        be = load_backend(root, manifest, backend=backend, threads=threads, providers=providers,
                          trust_engine_code=trust_engine_code)
        if tok.vocab_size > be.vocab:
            raise EngineError(f"{root}: the tokenizer has {tok.vocab_size} tokens but the model only "
                              f"{be.vocab} logits; the tokenizer files do not belong to this model")
        return cls(root, manifest, be, tok)

    # ---- requests ----------------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> list[int]:
        """A string is encoded with the tokenizer's special tokens; a message list goes through the chat
        template; a list of ints is taken as token ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if _is_messages(prompt):
            return self.tokenizer.encode_chat(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                        for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.backend.vocab]
            if bad:
                raise EngineError(f"token id {bad[0]} is outside the vocabulary (0..{self.backend.vocab - 1})")
            return list(prompt)
        raise EngineError("a prompt is a string, a list of chat messages, or a list of token ids")

    def config(self, max_new_tokens: int = 128, temperature: float | None = None, top_p: float | None = None,
               top_k: int | None = None, repetition_penalty: float | None = None, stop=None,
               seed: int | None = None, ignore_eos: bool = False) -> GenerationConfig:
        """A GenerationConfig; sampling knobs left as None come from generation_config.json (greedy if it
        does not ask for sampling)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        g = self.tokenizer.generation_config
        sampled = bool(g.get("do_sample"))
        if temperature is None:
            temperature = float(g.get("temperature", 1.0)) if sampled else 0.0
        if top_p is None:
            top_p = float(g.get("top_p", 1.0)) if sampled else 1.0
        if top_k is None:
            top_k = int(g.get("top_k", 50)) if sampled else 0
        if repetition_penalty is None:
            repetition_penalty = float(g.get("repetition_penalty", 1.0))
        if isinstance(stop, str):
            stop = [stop]
        return GenerationConfig(max_new_tokens=max_new_tokens,
                                sampling=SamplingParams(temperature, top_p, top_k, repetition_penalty),
                                stop=tuple(stop or ()), seed=seed, ignore_eos=ignore_eos)

    def sequence(self, prompt, config: GenerationConfig, on_text=None) -> Sequence:
        return Sequence(self.encode_prompt(prompt), config, self.tokenizer, self.eos_ids, on_text=on_text,
                        context=self.context_length)

    def _prompts(self, prompt_or_messages) -> tuple[list, bool]:
        x = prompt_or_messages
        if isinstance(x, list) and x and all(isinstance(p, (str, list)) for p in x):
            return list(x), True
        if isinstance(x, list) and not x:
            raise EngineError("the prompt list is empty")
        return [x], False

    def generate(self, prompt_or_messages, max_new_tokens: int = 128, **kw) -> Result | list[Result]:
        """Continue a prompt (string, chat messages or token ids); a list of prompts runs as one batch and
        returns a list of Results. Keywords: temperature, top_p, top_k, repetition_penalty, stop, seed,
        ignore_eos (see ``config``)."""
        prompts, is_batch = self._prompts(prompt_or_messages)
        cfg = self.config(max_new_tokens, **kw)
        seqs = [self.sequence(p, cfg) for p in prompts]
        with self._lock:
            results = run_to_end(self.backend, seqs)
        return results if is_batch else results[0]

    def stream(self, prompt_or_messages, max_new_tokens: int = 128, **kw) -> Iterator:
        """Yield text deltas (whole characters) as they are generated; they concatenate to the text
        ``generate`` returns. For a list of prompts, yields ``(index, delta)`` pairs."""
        prompts, is_batch = self._prompts(prompt_or_messages)
        cfg = self.config(max_new_tokens, **kw)
        pending: list = []
        seqs = []
        for i, p in enumerate(prompts):
            seqs.append(self.sequence(p, cfg, on_text=(lambda d, i=i: pending.append((i, d)))))
        with self._lock:
            batch = Batch(self.backend)
            try:
                batch.add(seqs)
                while True:
                    for i, d in pending:
                        yield (i, d) if is_batch else d
                    pending.clear()
                    if not len(batch):
                        break
                    batch.step()
            finally:  # the consumer stopped early: release the rows
                for s in seqs:
                    s.cancel()
        self.last_results = [s.result() for s in seqs]

    # ---- scoring -------------------------------------------------------------------------------------
    def score(self, ids) -> np.ndarray:
        """Logits [S, vocab] (float32) for every position of one token sequence, from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        s = ids.shape[1]
        if s == 0 or s > self.context_length:
            raise EngineError(f"score needs 1..{self.context_length} tokens, got {s}")
        with self._lock:
            cache = self.backend.allocate(1, s)
            out = self.backend.forward(cache, ids, np.ones((1, s), dtype=np.int64),
                                       np.arange(s, dtype=np.int64)[None], last_only=False)
            return np.array(out[0])

    def prompt_logprobs(self, ids, k: int = 0) -> list:
        """Per token of ``ids``: None for the first, then a ``TokenLogprob`` (the token's logprob given the
        tokens before it, and the ``k`` most likely tokens there). Scored in chunks: memory stays
        [chunk, vocab] of logits whatever the length."""
        from .logprobs import prompt_logprobs

        ids = [int(t) for t in ids]
        if not 0 < len(ids) <= self.context_length:
            raise EngineError(f"prompt_logprobs needs 1..{self.context_length} tokens, got {len(ids)}")
        with self._lock:
            return prompt_logprobs(self.backend, ids, k)[0]

    def describe(self) -> dict:
        a = self.manifest.architecture
        return {"path": str(self.root), "kind": self.manifest.kind, "model": self.model_name,
                "layers": a.layers, "hidden": a.hidden, "vocab": a.vocab, "context": self.context_length,
                "quantization": summarize(self.manifest.layer_specs().values()) or None,
                **self.backend.describe()}

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
