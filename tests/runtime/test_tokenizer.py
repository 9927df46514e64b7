"""Tokenizer and chat template read from the files, against transformers on the same files."""
import json
import shutil

import pytest

from runtime.errors import EngineError
from runtime.tokenizer import Tokenizer

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


def test_encode_decode_match_transformers(tiny_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok = Tokenizer(tiny_dir)
    text = "def f(x):\n    return x ** 2  # naïve"
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    ids = tok.encode(text)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tiny_dir, gen):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok = Tokenizer(tiny_dir)
    assert tok.apply_chat_template(MSGS, add_generation_prompt=gen) == \
        ref.apply_chat_template(MSGS, add_generation_prompt=gen, tokenize=False)
    want = ref.apply_chat_template(MSGS, add_generation_prompt=gen, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert tok.encode_chat(MSGS, add_generation_prompt=gen) == list(want)


def test_template_from_tokenizer_config(tiny_copy):
    tpl = (tiny_copy / "chat_template.jinja").read_text()
    (tiny_copy / "chat_template.jinja").unlink()
    assert Tokenizer(tiny_copy).chat_template is None
    cfg = json.loads((tiny_copy / "tokenizer_config.json").read_text()) | {"chat_template": tpl}
    (tiny_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(tiny_copy).apply_chat_template(MSGS[1:2]).startswith("<|im_start|>user\nHi there<|im_end|>")


def test_no_template_and_bad_messages(tiny_copy):
    (tiny_copy / "chat_template.jinja").unlink()
    with pytest.raises(EngineError, match="no chat template"):
        Tokenizer(tiny_copy).apply_chat_template(MSGS)
    tok = Tokenizer(tiny_copy)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(EngineError, match="roles must alternate"):
        tok.apply_chat_template(MSGS)
    with pytest.raises(EngineError, match="messages\\[1\\]"):
        tok.apply_chat_template([MSGS[0], {"role": "user", "content": 3}])


def test_missing_or_broken_tokenizer(tmp_path, tiny_dir):
    with pytest.raises(EngineError, match="tokenizer.json is missing"):
        Tokenizer(tmp_path)
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(EngineError, match="not valid JSON"):
        Tokenizer(tmp_path)


def test_eos_ids_from_generation_config(tiny_copy):
    (tiny_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer(tiny_copy)
    assert {2, 7, tok.token_to_id("<|im_end|>")} == set(tok.eos_ids)
