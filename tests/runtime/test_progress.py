"""Progress in a log: plain lines with elapsed time and ETA, rate-limited, the last one always."""
import io

from runtime import progress


def test_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    out = io.StringIO()
    b = progress._PlainBar(4, "gptq int8", stream=out)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    for _ in range(4):
        b.advance()
    lines = out.getvalue().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == [f"gptq int8: {i}/4" for i in range(1, 5)]
    assert "ETA" in lines[0] and lines[-1].endswith("done)")


def test_plain_lines_are_rate_limited_but_the_last_is_printed(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)
    b = progress._PlainBar(100, "perplexity", stream=out)
    for _ in range(100):
        b.advance()
    assert out.getvalue().splitlines() == ["perplexity: 100/100 (0s, done)"]


def test_bar_is_plain_without_a_terminal(capsys):
    assert isinstance(progress.bar(3, "x"), progress._PlainBar)  # pytest's captured stderr is no tty
    assert progress._fmt(59) == "59s" and progress._fmt(61) == "1m01s" and progress._fmt(3661) == "1h01m"
