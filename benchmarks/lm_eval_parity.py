"""lm-evaluation-harness through `kiln serve` against the same weights in PyTorch, item for item:

    .venv/bin/python benchmarks/lm_eval_parity.py --lmeval-python /tmp/venv-lmeval/bin/python \
        [--art ART --checkpoint HF_DIR] [--threads 2] [--work DIR]

Writes a multiple-choice task of its own (a task YAML and 40 JSONL items in --work; nothing downloads, and the
HF hub / datasets run offline), serves ART with `kiln serve` on 127.0.0.1 and runs `lm_eval --model
local-completions` against it (logprobs + echo on /v1/completions), then `lm_eval --model hf` on HF_DIR (the
fp32 checkpoint ART was exported from), and compares every (item, choice) loglikelihood and every item's
prediction. Without --art / --checkpoint it uses the tests' tiny random model (exported here). lm-eval lives in
its own venv (--lmeval-python), outside the project's dependencies. Exit code 1 when a loglikelihood differs by
more than --tol or an item's prediction differs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_live import ROOT, Served  # noqa: E402

ITEMS = [
    ("The capital of France is", [" Paris", " London", " Berlin", " Madrid"], 0),
    ("The capital of Italy is", [" Vienna", " Rome", " Lisbon", " Oslo"], 1),
    ("The capital of Japan is", [" Seoul", " Beijing", " Tokyo", " Bangkok"], 2),
    ("The capital of Germany is", [" Berlin", " Munich", " Hamburg", " Prague"], 0),
    ("The capital of Spain is", [" Barcelona", " Valencia", " Seville", " Madrid"], 3),
    ("The opposite of hot is", [" cold", " warm", " red", " fast"], 0),
    ("The opposite of up is", [" left", " down", " over", " high"], 1),
    ("The opposite of big is", [" huge", " tall", " small", " wide"], 2),
    ("The opposite of day is", [" noon", " week", " light", " night"], 3),
    ("The opposite of open is", [" closed", " door", " wide", " empty"], 0),
    ("Two plus two equals", [" five", " four", " three", " six"], 1),
    ("Ten minus three equals", [" six", " eight", " seven", " nine"], 2),
    ("Three times three equals", [" nine", " six", " twelve", " eight"], 0),
    ("The color of the sky on a clear day is", [" green", " blue", " purple", " brown"], 1),
    ("The color of grass is", [" green", " blue", " orange", " black"], 0),
    ("A cat says", [" moo", " woof", " meow", " quack"], 2),
    ("A dog says", [" woof", " meow", " baa", " oink"], 0),
    ("A cow says", [" neigh", " moo", " hiss", " tweet"], 1),
    ("Water freezes at zero degrees", [" Fahrenheit", " Kelvin", " Celsius", " Rankine"], 2),
    ("The largest planet in our solar system is", [" Mars", " Earth", " Venus", " Jupiter"], 3),
    ("The first month of the year is", [" January", " March", " June", " December"], 0),
    ("The last month of the year is", [" November", " December", " October", " January"], 1),
    ("There are seven days in a", [" month", " year", " week", " decade"], 2),
    ("The sun rises in the", [" east", " west", " north", " south"], 0),
    ("Python is a programming", [" snake", " language", " book", " game"], 1),
    ("To print text in Python you call the function", [" echo", " write", " print", " say"], 2),
    ("The chemical symbol for water is", [" H2O", " CO2", " NaCl", " O2"], 0),
    ("Bees make", [" milk", " honey", " silk", " wool"], 1),
    ("The author of Romeo and Juliet is William", [" Wordsworth", " Blake", " Shakespeare", " Golding"], 2),
    ("A triangle has three", [" sides", " wheels", " legs", " doors"], 0),
    ("A square has four equal", [" angles", " sides", " colors", " names"], 1),
    ("The Earth orbits the", [" Moon", " Mars", " Sun", " comet"], 2),
    ("Ice is frozen", [" water", " milk", " air", " sand"], 0),
    ("The boiling point of water at sea level is one hundred degrees", [" Kelvin", " Celsius", " Fahrenheit",
                                                                          " Newton"], 1),
    ("Humans breathe in", [" nitrogen", " helium", " oxygen", " argon"], 2),
    ("The fastest land animal is the", [" cheetah", " turtle", " snail", " cow"], 0),
    ("A baby cat is called a", [" puppy", " kitten", " calf", " foal"], 1),
    ("The plural of mouse is", [" mouses", " meese", " mice", " mousen"], 2),
    ("One hour has sixty", [" minutes", " seconds", " days", " weeks"], 0),
    ("Paris is a city in", [" Spain", " France", " Italy", " Belgium"], 1),
]

TASK_YAML = """task: kiln_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(work: Path) -> Path:
    tdir = work / "task"
    tdir.mkdir(parents=True, exist_ok=True)
    data = tdir / "kiln_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (tdir / "kiln_mc.yaml").write_text(TASK_YAML.format(data=str(data)))
    return tdir


def tiny(work: Path) -> tuple[Path, Path]:
    code = ("import sys; from pathlib import Path; sys.path.insert(0, %r)\n"
            "from tests.tiny import save_tiny\nfrom export.onnx import export_onnx\n"
            "d = save_tiny(Path(%r))\nexport_onnx(str(d), Path(%r), validate=False)\n"
            % (str(ROOT), str(work / "tiny-model"), str(work / "tiny-onnx")))
    if not (work / "tiny-onnx" / "kiln.json").is_file():
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return work / "tiny-onnx", work / "tiny-model"


def run_lmeval(py: str, model: str, model_args: str, tdir: Path, out: Path, limit: int | None) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [py, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", "kiln_mc",
           "--include_path", str(tdir), "--output_path", str(out), "--log_samples", "--batch_size", "1",
           "--device", "cpu"]
    if limit:
        cmd += ["--limit", str(limit)]
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"lm_eval --model {model} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    files = glob.glob(str(out / "**" / "samples_kiln_mc_*.jsonl"), recursive=True)
    if not files:
        raise SystemExit(f"lm_eval --model {model} wrote no samples under {out}")
    rows = [json.loads(line) for line in Path(sorted(files)[-1]).read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda d: d["doc_id"])


def logliks(sample: dict) -> list[float]:
    return [float(r[0][0]) for r in sample["resps"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lmeval-python", required=True, help="python of a venv with lm_eval[hf] installed")
    ap.add_argument("--art", help="ONNX artifact to serve (default: the tests' tiny model)")
    ap.add_argument("--checkpoint", help="the fp32 HF checkpoint ART was exported from")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--tol", type=float, default=1e-3, help="largest |loglikelihood difference| allowed")
    args = ap.parse_args(argv)
    if bool(args.art) != bool(args.checkpoint):
        ap.error("give --art and --checkpoint together")
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-lmeval-"))
    work.mkdir(parents=True, exist_ok=True)
    art, ckpt = (Path(args.art), Path(args.checkpoint)) if args.art else tiny(work)
    tdir = write_task(work)
    srv = Served(art, "--threads", str(args.threads), "--max-batch", "4")
    try:
        base = f"http://127.0.0.1:{srv.port}/v1/completions"
        served = run_lmeval(args.lmeval_python, "local-completions",
                            f"model={srv.model()},base_url={base},tokenizer={art},tokenizer_backend=huggingface,"
                            "tokenized_requests=True,num_concurrent=1,max_retries=1",
                            tdir, work / "out-served", args.limit)
    finally:
        srv.close()
    torch_rows = run_lmeval(args.lmeval_python, "hf", f"pretrained={ckpt},dtype=float32",
                            tdir, work / "out-hf", args.limit)
    if [d["doc_id"] for d in served] != [d["doc_id"] for d in torch_rows]:
        raise SystemExit("the two runs scored different items")
    worst, diff_pred, n_ll = 0.0, [], 0
    for a, b in zip(served, torch_rows):
        la, lb = logliks(a), logliks(b)
        worst = max(worst, max(abs(x - y) for x, y in zip(la, lb)))
        n_ll += len(la)
        if max(range(len(la)), key=la.__getitem__) != max(range(len(lb)), key=lb.__getitem__):
            diff_pred.append(a["doc_id"])
    acc_a = sum(d["acc"] for d in served) / len(served)
    acc_b = sum(d["acc"] for d in torch_rows) / len(torch_rows)
    print(f"\nitems {len(served)}, loglikelihoods {n_ll}")
    print(f"accuracy: kiln serve (local-completions) {acc_a:.4f}, PyTorch (hf) {acc_b:.4f}")
    print(f"max |loglikelihood difference| {worst:.2e} (tolerance {args.tol:g}); items predicted differently: "
          f"{diff_pred or 'none'}")
    ok = worst <= args.tol and not diff_pred and acc_a == acc_b
    print("parity: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
