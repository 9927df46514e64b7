"""`kiln pipeline`: load -> (prune) -> quantize -> export -> validate -> evaluate -> benchmark -> report.

Each stage writes its own artifact dir under OUT (``pruned/``, ``quantized/``, ``onnx/``, and ``reference-onnx/``
for the float baseline the gains are measured against). A stage whose dir holds a valid kiln.json made from the
same source and passes is reused unless ``force``. Everything is measured with the same code the single-stage
commands use (``kiln eval ppl``, ``kiln bench``), so the report and those commands agree.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.fsutil import atomic_write_text
from runtime.strict import to_json

from .recipe import Recipe, budget_config, build_config, split_calibration

QUANTIZED_KV_CHUNK = 128  # tokens per step through a quantized KV cache when the recipe's eval names none
DEFAULT_CONFIG = {"cpu": {"scheme": "int8-wo"}, "h100": {"scheme": "fp8", "ignore": ["lm_head"]}}


def default_recipe(target: str) -> Recipe:
    return Recipe(passes=[{"kind": "quantize", "config": dict(DEFAULT_CONFIG[target])}], target=target,
                  name=f"default-{target}")


@dataclass
class Stage:
    name: str
    path: str | None
    kind: str  # model | checkpoint | onnx | engine
    passes: list = field(default_factory=list)
    reused: bool = False
    seconds: float = 0.0
    ppl: float | None = None
    ppl_ratio: float | None = None
    bytes_on_disk: int | None = None
    parameters: int | None = None
    bench: dict | None = None
    validation: dict | None = None
    note: str | None = None

    def row(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "bench"}
        if self.bench:
            d |= {k: self.bench[k] for k in ("decode_tokens_per_s", "ttft_ms", "prefill_ms", "peak_rss_mb")
                  if k in self.bench}
        return d


# what _checkpoint_stage passes when a recipe leaves a calibration setting out (kept in step with it: the
# reuse test of an unchanged recipe fails when they drift)
CALIB_DEFAULTS = {"quantize": {"text": "builtin:pydoc", "samples": 16, "seq_len": 512},
                  "prune": {"text": "builtin:pydoc", "samples": 64, "seq_len": 512}}


def _calibration(kind: str, cfg: dict) -> dict:
    """The calibration a recipe pass runs with: its ``calibration`` settings over the defaults."""
    _, calib = split_calibration(cfg)
    want = {**CALIB_DEFAULTS[kind], **calib}
    want["samples"] = want["samples"] or CALIB_DEFAULTS[kind]["samples"]
    return want


def _stored_calibration(p) -> dict | None:
    """The calibration a kiln.json pass records: quantize passes in stats, prune passes in their config."""
    c = p.stats.get("calibration") if p.kind == "quantize" else p.config.get("calibration")
    return dict(c) if isinstance(c, dict) else None


def _same_budget(stored: list, wanted: dict) -> bool:
    """``stored`` (the quantize passes one budget search wrote) are that search: its last pass records the
    budget, target and formats the wanted (target-filled) budget pass asks for, and its calibration."""
    if not stored or any(p.kind != "quantize" for p in stored):
        return False
    rec = stored[-1].stats.get("budget")
    want = budget_config(wanted["config"], wanted["target"])
    if not isinstance(rec, dict) or {k: rec.get(k) for k in want} != want:
        return False
    return rec.get("calibration") == _calibration("quantize", wanted["config"])


def _same_passes(stored: list, wanted: list[dict]) -> bool:
    """The stored passes are the wanted ones: the same configs, and the same calibration (text, samples,
    seq_len) wherever the pass calibrates (every quantize pass records it; a prune pass when its method
    needs calibration). A budget pass (last, with its ``target``) stands for the passes its search wrote."""
    if wanted and "budget" in wanted[-1]["config"]:
        n = len(wanted) - 1
        return _same_passes(stored[:n], wanted[:n]) and _same_budget(stored[n:], wanted[-1])
    if [p.kind for p in stored] != [p["kind"] for p in wanted]:
        return False
    try:
        for s, w in zip(stored, wanted):
            cfg = {k: v for k, v in s.config.items() if k not in ("calibration",)}
            built = build_config(w["kind"], w["config"])
            if build_config(s.kind, cfg) != built:
                return False
            calibrates = s.kind == "quantize" or built[0].needs_calibration
            have = _stored_calibration(s)
            if calibrates and (have is None or have != _calibration(s.kind, w["config"])):
                return False
    except Exception:
        return False
    return True


def _export_differs(m, opset: int | None, source: str | None, max_memory: int | None) -> bool:
    """An ONNX stage made otherwise than this run would make it: another opset (the recipe's, else the
    exporter's default), not the kiln exporter, or validated less than this run would validate (skipped, or
    per layer where the whole model now fits)."""
    from export.onnx.export import DEFAULT_OPSET

    if m.io is None or m.io.opset != (opset or DEFAULT_OPSET) or m.io.exporter != "kiln":
        return True
    v = m.validation
    if v is None or v.skipped or v.passed is not True:
        return True
    if v.mode == "per-layer" and source is not None:
        from compress.sources import resolve
        from export.onnx.artifact import validation_mode

        if validation_mode(resolve(source, quiet=True), m.architecture, "auto", max_memory)[0] != v.mode:
            return True
    return False


KV_DTYPES = {"int8": "int8", "fp8": "float8e4m3fn"}  # a quantized cache's storage type in the IO record


def _reusable(path: Path, kind: str, source_sha: str | None, passes: list[dict], form: str | None = None, *,
              export: dict | None = None, kv_cache: str = "float") -> bool:
    """``path`` holds this stage's output as this run would make it: the same source, passes (configs and
    calibration), and for an ONNX stage (``export``: the recipe's ``opset``, the stage's ``source`` and the
    run's ``max_memory``) the same form, opset, exporter and at least the same validation. ``kv_cache``: for a
    checkpoint, ``int8`` wants recorded KV scales; for an ONNX stage, the cache it holds."""
    from runtime.manifest import ManifestError, read_manifest, verify_files

    if not (path / "kiln.json").is_file():
        return False
    try:
        m = read_manifest(path)
        verify_files(path, m)
    except ManifestError:
        return False
    if m.kind != kind or (source_sha and m.source.get("sha256") != source_sha):
        return False
    if kind == "onnx" and m.validation is not None and m.validation.passed is False:
        return False
    if form is not None and (m.io is None or m.io.form != form):
        return False
    if export is not None and _export_differs(m, export.get("opset"), export.get("source"), export.get("max_memory")):
        return False
    if kind == "checkpoint" and kv_cache == "int8" and m.kv_cache is None:
        return False
    if kind == "onnx" and (m.io is None or m.io.kv_dtype != KV_DTYPES.get(kv_cache, m.io.kv_dtype)
                           or (kv_cache == "float" and m.io.kv_quantized)):
        return False
    return _same_passes(m.passes, passes)


def _with_target(p: dict, target: str) -> dict:
    """A budget pass with the run's target and its formats filled in (checked against the target)."""
    if p["kind"] != "quantize" or "budget" not in p["config"]:
        return p
    cfg = dict(p["config"])
    full = budget_config(cfg, target)
    cfg["formats"] = full["formats"]
    return {"kind": "quantize", "config": cfg, "target": target}


def _artifact_memory(path: Path) -> int:
    """What loading an ONNX artifact into ONNX Runtime takes: its weights, once more while kernels repack
    them (MatMulNBits), and the runtime itself."""
    data = sum(p.stat().st_size for p in path.glob("*.onnx.data"))
    return 2 * data + (300 << 20)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "kiln.json")


class Pipeline:
    def __init__(self, source: str, out: str | Path, recipe: Recipe | None = None, target: str = "cpu",
                 force: bool = False, log=None, bench: bool = True, max_memory: int | None = None):
        from compress.memory import available_bytes

        self.source, self.out, self.force, self.bench_enabled = source, Path(out), force, bench
        self.max_memory = max_memory if max_memory is not None else available_bytes()
        self.target = (recipe.target if recipe and recipe.target else target)
        self.recipe = recipe or default_recipe(self.target)
        if not any(p["kind"] == "quantize" for p in self.recipe.passes) and recipe is None:
            self.recipe = default_recipe(self.target)
        self.recipe.passes = [_with_target(p, self.target) for p in self.recipe.passes]
        self.kv_cache = self.recipe.export.get("kv_cache", "float")
        self.log = log or (lambda msg: None)
        ev = self.recipe.eval
        self.eval = {"text": ev.get("text", "builtin:pydoc"), "windows": ev.get("windows", 8),
                     "seq_len": ev.get("seq_len", 512)}
        self.chunk = ev.get("chunk")
        b = self.recipe.bench
        self.bench_cfg = {"prompt_len": b.get("prompt_len", 32), "new_tokens": b.get("new_tokens", 128),
                          "runs": b.get("runs", 3)}
        self.threads = b.get("threads")
        self.stages: list[Stage] = []
        self.next_steps: list[str] = []
        self.progress = True

    # ---- stages ------------------------------------------------------------------
    def _checkpoint_stage(self, name: str, src: str, p: dict, passes_after: list[dict], sha: str | None) -> Stage:
        path = self.out / name
        t0 = time.perf_counter()
        record_kv = self.kv_cache == "int8" and p["kind"] == "quantize" and "budget" not in p["config"]
        if not self.force and _reusable(path, "checkpoint", sha, passes_after,
                                        kv_cache="int8" if record_kv else "float"):
            self.log(f"[{name}] reusing {path}")
            return Stage(name, str(path), "checkpoint", passes_after, reused=True)
        cfg, calib = split_calibration(p["config"])
        self.log(f"[{name}] {p['kind']} {cfg}")
        text, samples, seq = calib.get("text", "builtin:pydoc"), calib.get("samples"), calib.get("seq_len", 512)
        if p["kind"] == "prune":
            from compress.prune import prune_checkpoint
            from compress.prune.config import config_from_dict

            config, recover = config_from_dict(cfg)
            prune_checkpoint(src, path, config, text=text, calib_samples=samples or 64, calib_seq_len=seq,
                             recover=recover, force=True, progress=self.progress)
        elif "budget" in cfg:
            from .budget import quantize_budget

            quantize_budget(src, path, budget=cfg["budget"], formats=",".join(cfg["formats"]), target=p["target"],
                            calib_text=text, calib_samples=samples or CALIB_DEFAULTS["quantize"]["samples"],
                            seq_len=seq, force=True, progress=self.progress, keep_artifact=False)
        else:
            from compress.quant.config import config_from_dict
            from compress.quant.entry import quantize_checkpoint

            kw = {"calib_samples": samples} if samples else {}
            quantize_checkpoint(src, config_from_dict(cfg), path, calib_text=text, seq_len=seq, eval_windows=None,
                                force=True, progress=self.progress, kv_cache="int8" if record_kv else None, **kw)
        return Stage(name, str(path), "checkpoint", passes_after, seconds=round(time.perf_counter() - t0, 1))

    def _default_form(self, src: str) -> str:
        """cpu: the ONNX Runtime form (faster decoding there) unless the checkpoint's LayerSpecs or the
        recipe's opset need the portable one; h100: portable (TensorRT reads only standard ops)."""
        from compress.sources import resolve
        from export.onnx.export import FUSED_OPSET
        from export.onnx.ortform import ort_form_refusal

        if self.target != "cpu" or self.recipe.export.get("opset") not in (None, FUSED_OPSET):
            return "portable"
        m = resolve(src, quiet=True).manifest
        specs = m.layer_specs() if m is not None else {}
        return "portable" if ort_form_refusal(specs) else "ort"

    def _export_stage(self, name: str, src: str, passes: list[dict], sha: str | None, kv_cache: str = "float"
                      ) -> Stage:
        from export.onnx import export_onnx
        from runtime.manifest import read_manifest

        path = self.out / name
        t0 = time.perf_counter()
        form = self.recipe.export.get("form") or self._default_form(src)
        reused = not self.force and _reusable(path, "onnx", sha, passes, form, export={
            "opset": self.recipe.export.get("opset"), "source": src, "max_memory": self.max_memory},
            kv_cache=kv_cache)
        if reused:
            self.log(f"[{name}] reusing {path}")
        else:
            kv = f", KV cache {kv_cache}" if kv_cache != "float" else ""
            self.log(f"[{name}] export ONNX ({form}{kv}) + validation on ONNX Runtime CPU")
            export_onnx(src, path, form=form, opset=self.recipe.export.get("opset"), validate=True, force=True,
                        progress=self.progress, max_memory=self.max_memory, kv_cache=kv_cache)
        m = read_manifest(path)
        return Stage(name, str(path), "onnx", passes, reused=reused, validation=to_json(m.validation),
                     seconds=round(time.perf_counter() - t0, 1))

    def _tensorrt_stage(self, onnx_dir: Path) -> Stage | None:
        cmd = f"kiln export tensorrt {onnx_dir} -o {self.out / 'engine'}"
        try:
            from export.tensorrt.build import device_info, load_tensorrt

            trt, cudart = load_tensorrt()
            device_info(cudart)
        except Exception as e:
            self.next_steps.append(f"TensorRT stage skipped ({' '.join(str(e).split())}). On the H100 machine run: {cmd}")
            return None
        from export.tensorrt import export_tensorrt

        t0 = time.perf_counter()
        path = self.out / "engine"
        export_tensorrt(onnx_dir, path, force=True, progress=self.log)
        return Stage("engine", str(path), "engine", seconds=round(time.perf_counter() - t0, 1))

    # ---- measurement ---------------------------------------------------------------
    def _measure(self, st: Stage, bench: bool) -> None:
        ev = self.eval
        if st.kind in ("model", "checkpoint"):
            from compress.evaluate import perplexity_streamed
            from compress.lazy import LazyModel
            from compress.prune.api import parameter_count_of
            from compress.quant.entry import source_dir
            from compress.sources import resolve
            from transformers import AutoTokenizer

            info = resolve(st.path or self.source, quiet=True)
            root = source_dir(info, quiet=True)
            specs = info.manifest.layer_specs() if info.manifest is not None else {}
            lazy = LazyModel(root, specs)  # one decoder layer at a time, whatever the model's size
            tok = AutoTokenizer.from_pretrained(str(root))
            st.ppl = perplexity_streamed(lazy, tok, text=ev["text"], seq_len=ev["seq_len"], windows=ev["windows"],
                                         progress=self.progress).ppl
            st.parameters = parameter_count_of(lazy) if not specs else None
            if st.path:
                st.bytes_on_disk = _dir_size(Path(st.path))
            return
        need = _artifact_memory(Path(st.path))
        if need > self.max_memory:
            from compress.memory import gib

            st.note = (f"perplexity and speed skipped: loading the artifact takes about {gib(need)}, over the "
                       f"--max-memory budget of {gib(self.max_memory)}")
            self.log(f"[{st.name}] {st.note}")
            st.bytes_on_disk = _dir_size(Path(st.path))
            return
        from runtime import Engine
        from runtime.bench import BenchConfig, benchmark
        from runtime.evaluate import perplexity as rt_perplexity

        backend = "tensorrt" if st.kind == "engine" else "onnxruntime"
        with Engine.load(st.path, backend=backend, threads=self.threads) as eng:
            chunk = self.chunk
            if chunk is None and eng.manifest.io is not None and eng.manifest.io.kv_quantized:
                chunk = QUANTIZED_KV_CHUNK  # one pass would never read the cache it stores
            st.ppl = rt_perplexity(eng, text=ev["text"], seq_len=ev["seq_len"], windows=ev["windows"],
                                   chunk=chunk).ppl
            if bench:
                self.log(f"[{st.name}] benchmark: {self.bench_cfg}")
                st.bench = benchmark(eng, BenchConfig(**self.bench_cfg))
        st.bytes_on_disk = _dir_size(Path(st.path))

    # ---- the whole run --------------------------------------------------------------
    def run(self) -> dict:
        from compress.checkpoint import source_record
        from compress.sources import resolve

        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        info = resolve(self.source)
        sha = source_record(info).get("sha256")
        size = sum(f.stat().st_size for f in info.weight_files())
        base = Stage("source", None, "model", note=f"{info.kind} weights at {info.path} ({size / 1e6:.1f} MB)")
        self.stages.append(base)
        src, passes = self.source, []
        for i, p in enumerate(self.recipe.passes):
            passes = passes + [p]
            name = "pruned" if p["kind"] == "prune" else "quantized"
            st = self._checkpoint_stage(name, src, p, passes, sha)
            self.stages.append(st)
            src = st.path
        ref = self._export_stage("reference-onnx", self.source, [], sha)
        self.stages.append(ref)
        kv = self.kv_cache
        final = self._export_stage("onnx", src, passes, sha, kv) if passes or kv != "float" else ref
        if final is not ref:
            self.stages.append(final)
        engine = self._tensorrt_stage(Path(final.path)) if self.target == "h100" else None
        if engine:
            self.stages.append(engine)
        for st in self.stages:
            self.log(f"[{st.name}] evaluate" + (" + benchmark" if st.kind in ("onnx", "engine") else ""))
            bench = self.bench_enabled and st.kind in ("onnx", "engine") and (self.target == "cpu" or st.kind == "engine")
            self._measure(st, bench)
        for st in self.stages:
            st.ppl_ratio = st.ppl / base.ppl if st.ppl and base.ppl else None
        if self.target == "h100" and not engine:
            self.next_steps.append("CPU speed of FP8/INT8-static QDQ graphs is not representative; "
                                   "benchmark the engine on the H100 with kiln bench ENGINE_DIR")
        return self._report(time.perf_counter() - t0)

    def _report(self, seconds: float) -> dict:
        from .report import write_report

        report = {"source": self.source, "target": self.target, "recipe": self.recipe.name,
                  "passes": self.recipe.passes, "eval": self.eval, "bench": self.bench_cfg,
                  "stages": [s.row() for s in self.stages], "next_steps": self.next_steps,
                  "seconds": round(seconds, 1), "output": str(self.out)}
        final = [s for s in self.stages if s.kind in ("onnx", "engine")][-1]
        report["artifact"] = final.path
        write_report(self.out, report)
        atomic_write_text(self.out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
        return report
