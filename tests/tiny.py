"""Tiny random Llama models and a real (small) BPE tokenizer for unit tests: seconds, no download."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_text() -> str:
    from runtime.corpus import load_text

    return load_text("builtin:pydoc")


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on a slice of the pydoc corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = corpus_text()[:200_000]
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 128, tied: bool = True, model_type: str = "llama",
               rope_scaling: dict | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=tied,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if rope_scaling:
        kw["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # give norms some spread so tests see non-trivial scales
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.eval()


def save_tiny(path: Path, seed: int = 0, **kw) -> Path:
    tok = make_tokenizer()
    model = make_model(len(tok), seed=seed, **kw)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path
