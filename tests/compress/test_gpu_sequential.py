"""The layer-by-layer quantizer on CUDA gives the CPU's codes (GPU machines only)."""
import pytest
import torch

from compress.quant import config_for
from compress.quant.entry import pick_device, quantize_checkpoint


def test_device_choice_and_a_missing_gpu_in_one_line():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        from compress.errors import CompressError

        with pytest.raises(CompressError, match="--device cuda: torch sees no CUDA GPU"):
            pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["int8-wo", "int4"])
def test_cuda_and_cpu_agree(tiny_dir, tmp_path, scheme):
    from benchmarks.gpu.sequential_check import codes_of

    for dev in ("cuda", "cpu"):
        quantize_checkpoint(str(tiny_dir), config_for(scheme), tmp_path / dev, calib_samples=4, seq_len=64,
                            eval_windows=None, device=dev)
    a, b = codes_of(tmp_path / "cuda"), codes_of(tmp_path / "cpu")
    same = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].size for n in a)
    assert a.keys() == b.keys() and same >= 0.999
