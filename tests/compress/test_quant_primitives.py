"""Quantization primitives bit-exact against naive element-by-element references."""
import math

import numpy as np
import pytest
import torch

from compress.quant import primitives as P


def _rne(v: float) -> float:  # round half to even, written out
    f = math.floor(v)
    d = v - f
    if d > 0.5 or (d == 0.5 and f % 2 == 1):
        return f + 1.0
    return float(f)


def ref_int8_row(row, clip=1.0):
    scale = np.float32(max(abs(float(v)) for v in row) * clip / 127.0) if any(row) else np.float32(1.0)
    codes = [int(min(127, max(-127, _rne(float(np.float32(v) / scale))))) for v in row]
    return codes, scale


def ref_e4m3(v: float) -> float:
    """Nearest E4M3FN value (ties to even mantissa), saturating at +-448."""
    v = max(-448.0, min(448.0, v))
    if v == 0:
        return 0.0
    e = max(math.floor(math.log2(abs(v))), -6)  # subnormals below 2^-6
    step = 2.0 ** (e - 3)  # 3 mantissa bits
    return _rne(v / step) * step


def test_int8_weight_matches_reference():
    torch.manual_seed(0)
    w = torch.randn(7, 33) * torch.rand(7, 1) * 3
    w[3] = 0.0  # an all-zero row gets scale 1
    s = P.int8_weight_scale(w)
    q = P.quantize_int8(w, s)
    for i in range(w.shape[0]):
        codes, scale = ref_int8_row(w[i].tolist())
        assert q[i].tolist() == codes
        assert s[i].item() == float(scale)
    assert q.dtype == torch.int8


def test_round_half_to_even_on_ties():
    s = torch.tensor([1.0])
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -200.0]])
    assert P.quantize_int8(w, s)[0].tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -127]
    x = torch.tensor([0.5, 1.5, -128.5, 127.5, 300.0, -300.0])
    assert P.fake_quant_int8_static(x, torch.tensor(1.0)).tolist() == [0, 2, -128, 127, 127, -128]


def test_fp8_matches_reference_and_saturates():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(500) * 50, torch.tensor([448.0, 449.0, 464.0, 1e6, -1e6, 0.0, 2.0 ** -9, 3 * 2.0 ** -10])])
    got = P.to_fp8(x).float().tolist()
    want = [ref_e4m3(float(v)) for v in x]
    assert got == want
    assert P.to_fp8(torch.tensor([1e9, -1e9])).float().tolist() == [448.0, -448.0]
    s = torch.tensor(0.5)
    assert P.fake_quant_fp8_static(torch.tensor([1000.0]), s).tolist() == [224.0]
    w = torch.randn(4, 16)
    sc = P.fp8_weight_scale(w)
    assert torch.equal(sc, w.abs().amax(1) / 448)
    assert torch.equal(P.quantize_fp8(w, sc).float(), torch.tensor([[ref_e4m3(float(v) / float(sc[i]))
                                                                    for v in w[i]] for i in range(4)]))


def test_int4_codes_groups_and_packing_order():
    torch.manual_seed(2)
    w = torch.randn(3, 128)
    s = P.int4_scale(w, 32)
    assert s.shape == (3, 4)
    q = P.quantize_int4(w, s)
    for i in range(3):
        for j in range(128):
            g = j // 32
            assert s[i, g].item() == float(np.float32(w[i, g * 32:(g + 1) * 32].abs().max().item() / 7.0))
            assert q[i, j].item() == int(min(7, max(-8, _rne(float(np.float32(w[i, j].item()) / s[i, g].item())))))
    codes = torch.tensor([[1, -1, -8, 7, 0, 3]], dtype=torch.int8)
    packed = P.pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x1 | (0xF << 4), 0x8 | (0x7 << 4), 0x0 | (0x3 << 4)]]  # first element: low nibble
    assert torch.equal(P.unpack_int4(packed), codes)
    full = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(P.unpack_int4(P.pack_int4(full)), full)


def test_group_size_for_rule():
    assert P.group_size_for(1536) == 128
    assert P.group_size_for(576) == 64
    assert P.group_size_for(96) == 32
    assert P.group_size_for(1536, 64) == 64
    with pytest.raises(ValueError):
        P.group_size_for(100)


def test_dynamic_per_token():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 1.0, -0.01]])
    y = P.fake_quant_int8_dynamic(x)
    for r in range(3):
        m = max(abs(v) for v in x[r].tolist())
        st = np.float32(m / 127.0) if m else np.float32(1.0)
        want = [float(np.float32(_rne(float(np.float32(v) / st))) * st) for v in x[r].tolist()]
        assert y[r].tolist() == want


def test_dequantize_layouts():
    codes = torch.tensor([[1, -2, 3, 4]], dtype=torch.int8)
    assert P.dequantize(codes, torch.tensor([0.5])).tolist() == [[0.5, -1.0, 1.5, 2.0]]
    assert P.dequantize(codes, torch.tensor([[1.0, 2.0]])).tolist() == [[1.0, -2.0, 6.0, 8.0]]


# ---- GPTQ against direct oracles ----------------------------------------------------------------------------
def _w(out=48, inn=128, seed=0):
    return torch.randn(out, inn, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int8", 32), ("fp8", 0), ("int4", 32)])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(fmt, group):
    from compress.quant.gptq import gptq

    w = _w()
    codes, scale = gptq(w, torch.eye(w.shape[1]), fmt, group)
    if fmt == "int8":  # GPTQ's own scale rule is the plain max: the codes must be exactly RTN's
        ref_scale = P.int8_group_scale(w, group) if group else P.int8_weight_scale(w)
        assert torch.equal(scale, ref_scale)
        assert torch.equal(codes, P.quantize_int8(w, ref_scale))
    elif fmt == "fp8":
        assert torch.equal(scale, P.fp8_weight_scale(w))
        assert torch.equal(codes.float(), P.quantize_fp8(w, scale).float())
    else:  # int4 searches its clip; with no error feedback the codes are RTN at that scale
        assert scale.shape == (48, 128 // group)
        assert torch.equal(codes, P.quantize_int4(w, scale))


def test_gptq_block_size_changes_nothing_but_float_rounding():
    from compress.quant.gptq import gptq

    w = _w(seed=1)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(2))
    x[:, :4] *= 10  # uneven input scales, so act-order and the error feedback matter
    h = x.T @ x / 512
    for fmt, group in (("int4", 32), ("int8", 0)):
        a, sa = gptq(w, h, fmt, group, block=128)
        b, sb = gptq(w, h, fmt, group, block=16)
        assert torch.equal(sa, sb)
        assert (a == b).float().mean() >= 0.999
        rtn = P.quantize_int4(w, sa) if fmt == "int4" else P.quantize_int8(w, sa)
        assert (a != rtn).any()  # the feedback really changed codes


def _textbook_gptq(w, f, fmt, group, block=128):
    """GPTQ as the paper writes it (column-major updates with a temporary product), for comparison."""
    from compress.quant.gptq import int4_scale_search

    w = w.float().clone()
    w[:, f.dead] = 0.0
    n = w.shape[1]
    if fmt == "int4":
        scale, lo, hi = int4_scale_search(w, group, f.diag, rows=1 << 30), P.INT4_MIN, P.INT4_MAX
    else:
        scale, group, lo, hi = P.int8_weight_scale(w)[:, None], n, -P.INT8_MAX, P.INT8_MAX
    w, cs = w[:, f.perm], scale[:, f.perm // group]
    codes = torch.zeros_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1, h1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), f.hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = torch.clamp(torch.round(w1[:, i] / cs[:, i1 + i]), lo, hi)
            codes[:, i1 + i] = q
            e = (w1[:, i] - q * cs[:, i1 + i]) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ f.hinv[i1:i2, i2:]
    return codes[:, torch.argsort(f.perm)].to(torch.int8), scale


def test_gptq_matches_the_textbook_loop_and_the_chunked_scale_search():
    from compress.quant.gptq import factor, gptq, int4_scale_search

    w = _w(seed=3)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(4))
    x[:, :8] *= 8
    h = x.T @ x / 512
    f = factor(h.double().clone())
    for fmt, group in (("int4", 32), ("int8", 0)):
        ref, ref_scale = _textbook_gptq(w, f, fmt, group, block=32)
        codes, scale = gptq(w, f, fmt, group, block=32)
        assert torch.equal(scale if fmt == "int4" else scale[:, None], ref_scale)
        assert (codes == ref).float().mean() >= 0.999, fmt
    # the scale search, a few rows at a time, picks exactly what it picks over the whole matrix
    assert torch.equal(int4_scale_search(w, 32, f.diag, rows=7), int4_scale_search(w, 32, f.diag, rows=1 << 30))


def test_int4_scale_search_picks_the_clip_of_least_weighted_error():
    """Against the error written with the codes themselves (P.quantize_int4 / P.dequantize): the same scales."""
    from compress.quant.gptq import GROUP_CLIPS, int4_scale_search

    w = _w(seed=5)
    h = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(6))
    group = 32
    base = P.int4_scale(w, group)
    errs = []
    for c in GROUP_CLIPS:
        d = (P.dequantize(P.quantize_int4(w, base * c), base * c) - w).reshape(w.shape[0], -1, group)
        errs.append((d * d * h.reshape(1, -1, group)).sum(dim=2))
    best = torch.stack(errs).argmin(dim=0)  # the first clip wins ties, as in the search
    want = base * torch.tensor(GROUP_CLIPS)[best]
    got = int4_scale_search(w, group, h)
    assert torch.equal(got, want)
    assert (best > 0).any() and (best == 0).any()  # some groups clip, some do not: the search chose


def test_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    from compress.quant.gptq import factor

    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x[:, :4] *= 30
    x[:, 7] = 0  # a dead input
    h = x.T @ x / 256
    f = factor(h.clone(), damp=0.01)
    hp = h.clone()
    hp[7, 7] = 1.0
    d = torch.diag(hp)
    hp = hp[f.perm][:, f.perm]
    hp.diagonal().add_(0.01 * d.mean())
    u = f.hinv.double()
    assert torch.equal(u, torch.triu(u)) and bool(f.dead[7]) and f.dead.sum() == 1
    assert torch.allclose(u.T @ u, torch.linalg.inv(hp), rtol=1e-5, atol=1e-6 * torch.linalg.inv(hp).abs().max())
    # the textbook route (Cholesky, inverse, Cholesky of the inverse) gives the same factor
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    assert torch.allclose(u, ref, rtol=1e-5, atol=1e-6 * ref.abs().max())


@pytest.mark.parametrize("block", [16, 32])
def test_fake_quant_int8_blocks_is_onnx_runtime_kernel_input(block):
    """The budget's proxy sees a weight-only Linear's input as ONNX Runtime's fast kernel (MatMulNBits,
    accuracy level 4) quantizes it: the fake-quantized product matches the kernel to float32 round-off, and
    is further from the float product than that."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = 256, 48
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, k, generator=g) * torch.linspace(0.1, 8.0, k)  # uneven channels, like hidden states
    codes = torch.randint(-127, 128, (n, k), generator=g)
    scale = torch.rand(n, generator=g) * 1e-2 + 1e-3
    blob = (codes + 128).to(torch.uint8).reshape(n, k // block, block).numpy()
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=block, accuracy_level=4)
    s = scale[:, None].expand(n, k // block).contiguous().numpy()
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(blob, "B"), numpy_helper.from_array(s.reshape(-1), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_ort = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]).double()
    w = (codes.double() * scale.double()[:, None])
    y_fake = P.fake_quant_int8_blocks(x, block).double() @ w.T
    y_float = x.double() @ w.T
    span = float(y_float.abs().max())
    assert float((y_ort - y_fake).abs().max()) / span < 2e-6
    assert float((y_ort - y_float).abs().max()) / span > 1e-4
