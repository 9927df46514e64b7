"""Incremental detokenization (whole characters only) and stop-string hold-back."""
import pytest

from runtime.textstream import Detokenizer, StopText
from runtime.tokenizer import Tokenizer

TEXT = "naïve café — 日本語 emoji 🎉🎉 done\n  indented ÅÄÖ"


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer(tiny_dir)


def test_multibyte_characters_split_across_tokens(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    # the byte-level BPE splits these characters into several tokens each: some token is not valid UTF-8 alone
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    d = Detokenizer(tok)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in x for x in deltas)


def test_random_token_streams_concatenate(tok):
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(3, tok.vocab_size, size=30).tolist()
        d = Detokenizer(tok)
        out = "".join(d.push(i) for i in ids) + d.flush()
        assert out == tok.decode(ids)


def test_special_tokens_are_skipped(tok):
    end = tok.token_to_id("<|im_end|>")
    ids = tok.encode("hello", add_special_tokens=False) + [end] + tok.encode(" world", add_special_tokens=False)
    d = Detokenizer(tok)
    assert "".join(d.push(i) for i in ids) + d.flush() == "hello world"


def test_stop_text_holds_back_partial_matches():
    s = StopText(["END", "\n\n"])
    out = [s.feed(x) for x in ["abc E", "N", "x more\n", "\nlater"]]
    assert out == ["abc ", "", "ENx more", ""] and s.stopped and s.text == "abc ENx more"


def test_stop_text_stop_inside_one_delta_and_finish():
    s = StopText(["STOP"])
    assert s.feed("aSTOPb") == "a" and s.stopped and s.feed("more") == ""
    s = StopText(["STOP"])
    assert s.feed("xST") == "x" and s.finish() == "ST"
    s = StopText([])
    assert s.feed("anything") == "anything"
