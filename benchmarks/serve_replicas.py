"""Issue 18's scale-out gate: aggregate tokens/s of 8 concurrent streaming clients through

    A  kiln serve ART --replicas 1 --threads 1     (one Ray Serve replica, one intra-op thread)
    B  kiln serve ART --replicas 2 --threads 1     (two replicas x one thread)
    C  kiln serve ART --threads 2                  (the plain server, one process, two threads)

all in the same run (each server started in turn on 127.0.0.1, a local Ray on 127.0.0.1 for A and B), with
the gates B >= 1.6 x A and B >= 0.9 x C. Each client loops greedy streamed completions (distinct ~32-token
prompts, --max-tokens new tokens, ignore_eos) and counts the tokens the server reports (include_usage);
tokens/s is every client's tokens over the wall time of the round. Medians of --rounds rounds after a warm-up
round. Beside wall time, the CPU seconds the server's whole process tree spent (the kiln process, and for A
and B every Ray process it started: replicas, raylet, GCS, controller) give tokens per CPU second, which a
box shared with other work disturbs far less than tokens/s. The 1-minute load average before and after is
printed: on a shared box the wall figures are not quiet-box figures.

    .venv/bin/kiln export onnx smollm2-135m -o /tmp/smol-ort --form ort
    .venv/bin/python benchmarks/serve_replicas.py /tmp/smol-ort
    .venv/bin/python benchmarks/serve_replicas.py          # the tests' tiny model (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_live import HOST, Served, artifact  # noqa: E402

CONFIGS = [("A: 1 replica x 1 thread", ["--replicas", "1", "--threads", "1"]),
           ("B: 2 replicas x 1 thread", ["--replicas", "2", "--threads", "1"]),
           ("C: plain, 2 threads", ["--threads", "2"])]
TOPICS = ["the river", "a lighthouse", "the old library", "a mountain pass", "the harbour at dawn",
          "a clockmaker", "the desert road", "a winter garden"]


def prompt(i: int, r: int) -> str:
    return (f"Write a short story about {TOPICS[i % len(TOPICS)]}, number {r}. It begins on a quiet evening "
            "when the wind changes and someone knocks on the door.")


def cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and every process below it (from /proc)."""
    parent, times = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)] = int(fields[1])
            times[int(d)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree and p not in tree}
        tree |= new
        grew = bool(new)
    return sum(times.get(p, 0.0) for p in tree)


def one_round(srv: Served, model: str, clients: int, requests: int, max_tokens: int, r: int) -> dict:
    import openai

    tokens = [0] * clients
    errors: list = []

    def client(i):
        c = openai.OpenAI(base_url=f"http://{HOST}:{srv.port}/v1", api_key="none", max_retries=0, timeout=600)
        for k in range(requests):
            try:
                s = c.completions.create(model=model, prompt=prompt(i, r * requests + k),
                                         max_tokens=max_tokens, temperature=0, stream=True,
                                         stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True})
                for ch in s:
                    if ch.usage is not None:
                        tokens[i] += ch.usage.completion_tokens
            except Exception as e:  # noqa: BLE001 - reported, and the round does not count
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    cpu0, t0 = cpu_seconds(srv.proc.pid), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, cpu_seconds(srv.proc.pid) - cpu0
    return {"tokens": sum(tokens), "seconds": wall, "tokens_per_s": sum(tokens) / wall, "cpu_seconds": cpu,
            "tokens_per_cpu_s": sum(tokens) / cpu if cpu else None, "errors": errors}


_BATCH_EFFICIENCY = r"""
import json, resource, sys, time
from runtime import Engine
eng = Engine.load(sys.argv[1], threads=1)
ps = [f"Write a short story about topic {i}. It begins on a quiet evening when the wind changes."
      for i in range(8)]
eng.generate(ps[:2], max_new_tokens=8, ignore_eos=True)
out = {}
for n in (4, 8, 4, 8):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    res = eng.generate(ps[:n], max_new_tokens=int(sys.argv[2]), ignore_eos=True)
    toks = sum(len(x.token_ids) for x in res)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.setdefault(n, []).append(toks / (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime))
print(json.dumps({n: max(v) for n, v in out.items()}))
"""


def batch_efficiency(art: Path, max_tokens: int) -> dict:
    """Tokens per CPU second of the engine alone (1 thread, no server) at batch 4 and at batch 8: 8 clients
    on two replicas decode 4 rows a step each, on one replica 8 rows, and a step costs far from rows x one
    row."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", _BATCH_EFFICIENCY, str(art), str(max_tokens)],
                       capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def load1() -> float:
    return os.getloadavg()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("art", nargs="?", help="artifact dir (default: the tests' tiny model)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    art = artifact(args.art)
    out = {"art": str(art), "clients": args.clients, "requests_per_client": args.requests,
           "max_tokens": args.max_tokens, "rounds": args.rounds, "cpus": len(os.sched_getaffinity(0)),
           "load1_before": load1(), "configs": {}}
    print(f"{art}: {args.clients} clients x {args.requests} streamed requests x {args.max_tokens} tokens, "
          f"median of {args.rounds} rounds; load average {out['load1_before']:.2f} on {out['cpus']} CPUs",
          flush=True)
    for name, flags in CONFIGS:
        t0 = time.perf_counter()
        srv = Served(art, "--max-batch", str(args.clients), *flags)
        try:
            started = time.perf_counter() - t0
            model = srv.model()
            one_round(srv, model, args.clients, 1, args.max_tokens, 0)  # warm-up
            rounds = [one_round(srv, model, args.clients, args.requests, args.max_tokens, r + 1)
                      for r in range(args.rounds)]
            health = json.loads(srv.request("GET", "/health")[1])
        finally:
            srv.close()
        ok = [r["tokens_per_s"] for r in rounds if not r["errors"]]
        res = {"flags": flags, "start_s": started, "rounds": rounds, "load1": load1(),
               "tokens_per_s": statistics.median(ok) if ok else None,
               "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in rounds
                                                     if r["tokens_per_cpu_s"]),
               "per_replica_tokens": [r.get("generated_tokens") for r in health.get("replica_list", [])]}
        out["configs"][name] = res
        per = " ".join(f"{r['tokens_per_s']:.1f}" for r in rounds)
        errs = sum(len(r["errors"]) for r in rounds)
        print(f"{name:28s} median {res['tokens_per_s'] or float('nan'):7.1f} tok/s, "
              f"{res['tokens_per_cpu_s']:.1f} tok per CPU s  (rounds {per}; "
              f"started in {started:.0f} s; errors {errs}; per replica {res['per_replica_tokens']}; "
              f"load {res['load1']:.2f})", flush=True)
        for r in rounds:
            for e in r["errors"][:3]:
                print("   ", e[:200])
    a, b, c = (out["configs"][n]["tokens_per_s"] for n, _ in CONFIGS)
    out["load1_after"] = load1()
    if None in (a, b, c):
        print("a configuration had no clean round; no ratios")
        return 1
    out["b_over_a"], out["b_over_c"] = b / a, b / c
    gate = out["b_over_a"] >= 1.6 and out["b_over_c"] >= 0.9
    eff = out["engine_tokens_per_cpu_s"] = batch_efficiency(art, args.max_tokens)
    print(f"engine alone, 1 thread: {eff[4]:.1f} tokens per CPU s at batch 4, {eff[8]:.1f} at batch 8: two "
          f"replicas of 4 rows on two free cores can reach at most 2 x {eff[4]:.1f} / {eff[8]:.1f} = "
          f"{2 * eff[4] / eff[8]:.2f} x one replica of 8 rows on one")
    print(f"B / A = {b / a:.2f} (gate >= 1.6)   B / C = {b / c:.2f} (gate >= 0.9)   "
          f"{'PASS' if gate else 'FAIL'}; load average {out['load1_before']:.2f} before, "
          f"{out['load1_after']:.2f} after")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if gate else 1


if __name__ == "__main__":
    sys.exit(main())
