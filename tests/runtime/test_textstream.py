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


# ---- issue 15, item 1: stop strings of bounded cost, a detokenizer window that always advances ---------------
def _naive_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reference: cut at the stop string that completes first (ending earliest; the longest on a tie)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0:
            key = (i + len(s), -len(s))
            if best is None or key < best[0]:
                best = (key, i)
    return (text, False) if best is None else (text[:best[1]], True)


def test_stop_text_matches_the_reference_for_any_split():
    import random

    rng = random.Random(0)
    for _ in range(400):
        alphabet = "ab c"
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        s = StopText(stops)
        out, i = [], 0
        while i < len(text) and not s.stopped:
            n = rng.randint(1, 5)
            out.append(s.feed(text[i:i + n]))
            i += n
        if not s.stopped:
            out.append(s.finish())
        want, stopped = _naive_stop(text, stops)
        assert ("".join(out), s.stopped) == (want, stopped), (stops, text)


def test_stop_text_cost_does_not_grow_with_stop_length():
    import time

    def run(length):
        s = StopText(["a" * length, "b" * length, "c" * length, "d" * length])
        t0 = time.perf_counter()
        out = [s.feed("x") for _ in range(20_000)]
        assert "".join(out) == "x" * 20_000  # nothing held back: no suffix begins a stop
        return time.perf_counter() - t0

    run(8)
    short, long = min(run(8) for _ in range(2)), min(run(256) for _ in range(2))
    # the old suffix scan tried every suffix up to the longest stop on every token: 256-char stops cost ~30x
    assert long < 3 * short + 0.05, (short, long)


def test_stop_text_holds_back_a_long_partial_stop():
    stop = "0123456789" * 25  # 250 characters
    s = StopText([stop])
    assert s.feed("abc" + stop[:200]) == "abc"  # the 200 characters that begin the stop are held
    assert s.feed(stop[200:249]) == "" and s.feed("!") == stop[:249] + "!"  # it did not complete
    s = StopText([stop])
    assert s.feed("abc" + stop[:100]) == "abc" and s.feed(stop[100:]) == "" and s.stopped


def test_detokenizer_window_advances_over_special_tokens(tok):
    end = tok.token_to_id("<|im_end|>")
    word = tok.encode("hello", add_special_tokens=False)
    d = Detokenizer(tok)
    out = [d.push(i) for i in word]
    widths = []
    for _ in range(5000):  # a model stuck emitting special tokens
        out.append(d.push(end))
        widths.append(len(d.ids) - d.prefix)
    out += [d.push(i) for i in word] + [d.flush()]
    assert "".join(out) == "hellohello"
    assert max(widths) <= 2  # the window stays a few tokens, not the 5000 emitted


def test_detokenizer_window_is_bounded_on_invalid_bytes(tok):
    # byte tokens that never complete a character: the window lets them go as U+FFFD after a few
    lone = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]
    assert lone
    ids = [lone[0]] * 100
    d = Detokenizer(tok)
    widths = []
    out = []
    for i in ids:
        out.append(d.push(i))
        widths.append(len(d.ids) - d.prefix)
    out.append(d.flush())
    assert max(widths) <= 2 * 9 and "".join(out) == tok.decode(ids)
