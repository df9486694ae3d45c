"""The CUDA path gives the CPU path's results (run on a GPU machine; skipped elsewhere)."""

import pytest
import torch

from adaptkit.merge import merge
from conftest import ADAPTERS, BASE_OF, load_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_cuda_equals_cpu(tmp_path, name, dtype):
    merge(BASE_OF[name], [ADAPTERS[name]], tmp_path / "cpu", device="cpu", dtype=dtype, warn=lambda m: None)
    merge(BASE_OF[name], [ADAPTERS[name]], tmp_path / "cuda", device="cuda", dtype=dtype, warn=lambda m: None)
    cpu, cuda = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    assert set(cpu) == set(cuda)
    for k in cpu:
        a, b = cpu[k].double(), cuda[k].double()
        eps = torch.finfo(cpu[k].dtype).eps if cpu[k].is_floating_point() else 0
        # within one unit of the output dtype: only the fp32 accumulation order differs
        assert ((a - b).abs() <= eps * a.abs() + 1e-6).all(), k
