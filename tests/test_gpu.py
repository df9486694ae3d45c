"""The CUDA paths give the CPU paths' results (run on a GPU machine; skipped elsewhere)."""

import pytest
import torch
from helpers import ADAPTERS, BASE_OF, load_dir

from adaptkit import merge

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _assert_same_merge(tmp_path) -> None:
    """The merges at tmp_path/cpu and tmp_path/cuda hold the same tensors, each within one unit of the output
    dtype (only the fp32 accumulation order differs)."""
    cpu, cuda = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    assert set(cpu) == set(cuda)
    for k in cpu:
        a, b = cpu[k].double(), cuda[k].double()
        eps = torch.finfo(cpu[k].dtype).eps if cpu[k].is_floating_point() else 0
        assert ((a - b).abs() <= eps * a.abs() + 1e-6).all(), k


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_cuda_equals_cpu(tmp_path, name, dtype):
    merge(BASE_OF[name], [ADAPTERS[name]], tmp_path / "cpu", device="cpu", dtype=dtype)
    merge(BASE_OF[name], [ADAPTERS[name]], tmp_path / "cuda", device="cuda", dtype=dtype)
    _assert_same_merge(tmp_path)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_combine_cuda_equals_cpu(tmp_path, method):
    from adaptkit import combine, load_adapter

    ads = [ADAPTERS["llama-lora"], ADAPTERS["llama-rslora-patterns"]]
    kw = {} if method == "linear" else {"density": 0.5, "rank": 64}
    combine(ads, tmp_path / "cpu", method=method, device="cpu", seed=5, **kw)
    combine(ads, tmp_path / "cuda", method=method, device="cuda", seed=5, **kw)
    a, b = load_adapter(tmp_path / "cpu"), load_adapter(tmp_path / "cuda")
    for name in a.modules:  # the same ΔW (factors may differ in sign), DARE masks included
        assert torch.allclose(a.modules[name].delta(), b.modules[name].delta(), atol=1e-5), name


def test_verify_model_level_on_cuda(tmp_path):
    from adaptkit import verify

    merge(BASE_OF["llama-dora"], [ADAPTERS["llama-dora"]], tmp_path / "m", device="cuda")
    report = verify(BASE_OF["llama-dora"], [ADAPTERS["llama-dora"]], tmp_path / "m", device="cuda")
    assert report.ok and report.model is not None and report.model.mean_kl < 1e-6


@pytest.mark.parametrize("quantize", [None, "same"])
def test_fp8_cuda_equals_cpu(tmp_path, quantize):
    """The FP8 codecs on the GPU: the committed block-wise FP8 Llama, dense and kept FP8."""
    from helpers import FIXTURES

    base, adapter = FIXTURES / "tiny-llama-fp8", ADAPTERS["llama-lora"]
    merge(base, [adapter], tmp_path / "cpu", device="cpu", quantize=quantize)
    merge(base, [adapter], tmp_path / "cuda", device="cuda", quantize=quantize)
    cpu, cuda = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    assert set(cpu) == set(cuda)
    for k in cpu:
        a, b = cpu[k].float(), cuda[k].float()
        if cpu[k].dtype == torch.float8_e4m3fn:  # a value on a rounding boundary may land one FP8 step apart
            assert ((a - b).abs() > 0).float().mean() < 1e-3, k
        else:
            eps = torch.finfo(cpu[k].dtype).eps
            assert ((a - b).abs() <= eps * a.abs() + 1e-6).all(), k


@pytest.mark.parametrize("family", ["step3p7", "sarvam", "deepseek-v4"])
def test_layouts_transformers_converts_merge_on_cuda_as_on_the_cpu(tmp_path, family):
    """Experts stored as 3-D parts (Step 3.7), a module transformers splits out of a fused tensor (Sarvam-MoE)
    and regex-ruled per-expert tensors (DeepSeek-V4): the CUDA merge equals the CPU one to a unit of bf16."""
    import transformers

    from fixtures import build

    config, auto, lora = {
        "step3p7": (build.step3p7_config, transformers.AutoModelForImageTextToText,
                    dict(target_modules=r".*(vision_model.*\.(q_proj|k_proj)|language_model.*\.q_proj)",
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
        "sarvam": (build.sarvam_moe_config, None, dict(target_modules=["q_proj", "k_proj", "v_proj"])),
        "deepseek-v4": (build.deepseek_v4_config, None,
                        dict(target_modules=["q_a_proj"], target_parameters=["mlp.experts.gate_up_proj"])),
    }[family]
    build.build_model(config(), tmp_path / "base", dtype=torch.bfloat16, auto=auto)
    ad = build.build_adapter(tmp_path / "base", tmp_path / "lora", r=2, lora_alpha=4, base_dtype=torch.bfloat16,
                             **lora)
    merge(tmp_path / "base", [ad], tmp_path / "cpu", device="cpu")
    merge(tmp_path / "base", [ad], tmp_path / "cuda", device="cuda")
    _assert_same_merge(tmp_path)
