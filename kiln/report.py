"""Pipeline report: report.md (a table per stage) and report.png (perplexity vs size, tokens/s per stage)."""
from __future__ import annotations

from pathlib import Path

from runtime.fsutil import atomic_write_text

COLUMNS = [("stage", "name", "{}"), ("kind", "kind", "{}"), ("ppl", "ppl", "{:.4f}"), ("ratio", "ppl_ratio", "{:.4f}"),
           ("size MB", "bytes_on_disk", "{:.1f}"), ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
           ("TTFT ms", "ttft_ms", "{:.1f}"), ("prefill 512 ms", "prefill_ms", "{:.0f}"), ("reused", "reused", "{}")]


def cells(row: dict) -> list[str]:
    out = []
    for _, key, fmt in COLUMNS:
        v = row.get(key)
        if key == "bytes_on_disk" and v is not None:
            v = v / 1e6
        out.append("—" if v is None else fmt.format(v))
    return out


def markdown(report: dict) -> str:
    lines = [f"# llmkiln pipeline: {report['source']} → {report['target']}", "",
             (f"Recipe `{report['recipe']}`; perplexity on {report['eval']['text']}, {report['eval']['windows']} × "
              f"{report['eval']['seq_len']} tokens; speed on ONNX Runtime CPU, batch 1, prompt "
              f"{report['bench']['prompt_len']}, {report['bench']['new_tokens']} new tokens, median of "
              f"{report['bench']['runs']} runs."), "",
             "| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["stages"]:
        lines.append("| " + " | ".join(cells(row)) + " |")
    lines += ["", f"Artifact to serve: `{report['artifact']}` (`kiln serve {report['artifact']}`).", ""]
    for row in report["stages"]:
        v = row.get("validation")
        if v:
            lines.append(f"- validation of `{row['name']}`: " + ", ".join(
                f"{k} {v[k]}" for k in sorted(v) if isinstance(v[k], (int, float, str, bool))))
    for step in report["next_steps"]:
        lines.append(f"- next: {step}")
    if report.get("plot"):
        lines += ["", f"![perplexity vs size and speed]({report['plot']})"]
    return "\n".join(lines) + "\n"


PLOT_MISSING = "report.png skipped: matplotlib is not installed (pip install 'llmkiln[report]')"


def plot(report: dict, path: Path) -> bool:
    """Draw report.png; False when matplotlib is not installed. Uses a private Figure and Agg canvas, so no
    matplotlib global state (backend, pyplot figure registry) changes for whoever else uses matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "matplotlib":
            return False
        raise
    rows = [r for r in report["stages"] if r.get("ppl") and r.get("bytes_on_disk")]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    for r in rows:
        a.scatter(r["bytes_on_disk"] / 1e6, r["ppl"])
        a.annotate(r["name"], (r["bytes_on_disk"] / 1e6, r["ppl"]), textcoords="offset points", xytext=(4, 4))
    a.set_xlabel("size on disk (MB)")
    a.set_ylabel("perplexity")
    a.set_title("quality vs size")
    speed = [r for r in report["stages"] if r.get("decode_tokens_per_s")]
    b.bar([r["name"] for r in speed], [r["decode_tokens_per_s"] for r in speed], color="tab:orange")
    b.set_ylabel("decode tokens/s")
    b.set_title("speed (batch 1)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)
    return True


def write_report(out: Path, report: dict) -> None:
    """report.md always; report.png beside it when matplotlib is installed, else one line on stderr."""
    if plot(report, out / "report.png"):
        report["plot"] = "report.png"
    else:
        from runtime.progress import note

        (out / "report.png").unlink(missing_ok=True)  # a plot of an earlier run would not match this report
        note(PLOT_MISSING)
    atomic_write_text(out / "report.md", markdown(report))
