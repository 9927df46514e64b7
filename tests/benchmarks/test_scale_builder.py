"""benchmarks/scale.py's instrument: the streamed random-Llama builder and the peak-RSS meter (fast, no download)."""
import json
import sys

import pytest

from benchmarks.scale_build import SHAPES, build, plan_shards
from benchmarks.scale_meter import run_measured
from tests.tiny import make_tokenizer

MIB = 1 << 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    make_tokenizer().save_pretrained(str(root / "tok"))
    # 40 kB shards: the tiny shape (6.4 MB bf16, most of it the embedding) lands in several
    return build(SHAPES["tiny"], root / "model", seed=3, shard_bytes=40_000, tokenizer_dir=root / "tok",
                 log=lambda s: None)


def test_index_lists_every_tensor_once_and_shards_hold_bf16_of_the_right_shapes(built):
    from safetensors import safe_open

    shape = SHAPES["tiny"]
    index = json.loads((built / "model.safetensors.index.json").read_text())
    expected = {name: s for name, s, _ in shape.tensors()}
    assert sorted(index["weight_map"]) == sorted(expected)
    shards = sorted(built.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    seen = []
    for p in shards:
        assert p.name.endswith(f"-of-{len(shards):05d}.safetensors")
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                seen.append(name)
                t = f.get_tensor(name)
                assert str(t.dtype) == "torch.bfloat16" and tuple(t.shape) == expected[name]
                assert index["weight_map"][name] == p.name
    assert sorted(seen) == sorted(expected)  # each tensor in exactly one shard
    assert index["metadata"]["total_size"] == 2 * shape.params


def test_transformers_loads_it_with_the_config_written(built):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = SHAPES["tiny"]
    model = AutoModelForCausalLM.from_pretrained(str(built), dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(str(built))
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 2, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, 49152)
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5
    rope = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    assert sum(p.numel() for p in model.parameters()) == shape.params
    q0 = model.model.layers[0].self_attn.q_proj.weight
    q1 = model.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(q0, q1) and 0.015 < q0.std().item() < 0.025  # seeded per tensor, std 0.02
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 300]])).logits
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_and_reused(built, tmp_path):
    again = build(SHAPES["tiny"], tmp_path / "again", seed=3, shard_bytes=40_000, tokenizer_dir=built,
                  log=lambda s: None)
    for p in sorted(built.glob("model-*.safetensors")):
        assert (again / p.name).read_bytes() == p.read_bytes()
    logs = []
    build(SHAPES["tiny"], again, seed=3, shard_bytes=40_000, tokenizer_dir=built, log=logs.append)
    assert logs and "reusing" in logs[0]


def test_shards_never_split_a_tensor():
    tensors = SHAPES["1b"].tensors()
    shards = plan_shards(tensors, 2 * 10**9)
    assert [t for s in shards for t in s] == tensors and len(shards) == 2
    assert all(sum(2 * a * (b[0] if b else 1) for _, (a, *b), _ in s) <= 2 * 10**9 for s in shards[:-1])


def test_rss_meter_sees_a_child_that_allocates_200_mib():
    code = "import time; b = b'x' * (200 * 1024 * 1024); time.sleep(0.5)"
    m = run_measured([sys.executable, "-c", code])
    assert m.rc == 0 and m.killed_at_bytes is None
    assert 200 * MIB <= m.peak_rss_bytes <= 400 * MIB


def test_rss_meter_kills_past_its_limit():
    code = "import time; b = b'x' * (300 * 1024 * 1024); time.sleep(30)"
    m = run_measured([sys.executable, "-c", code], limit_bytes=100 * MIB, poll_s=0.05)
    assert m.killed_at_bytes is not None and m.killed_at_bytes > 100 * MIB and m.rc < 0 and m.wall_s < 20
