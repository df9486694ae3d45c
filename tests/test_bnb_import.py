"""bitsandbytes imported and run without torch._dynamo, with the same numbers as a plain import."""

import subprocess
import sys

from adaptkit.bnb_import import compile_on_first_call, disable_dynamo_once_loaded

RUN = """
import hashlib, sys, torch
real = (torch.compile, torch._disable_dynamo)
if sys.argv[1] == "adaptkit":
    from adaptkit.bnb_import import functional
    F = functional()
    assert (torch.compile, torch._disable_dynamo) == real, "torch's functions were not put back"
else:
    import bitsandbytes.functional as F
x = torch.randn(96, 200, generator=torch.Generator().manual_seed(0))
packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
dense = F.dequantize_4bit(packed, state)
h = hashlib.sha256(packed.numpy().tobytes() + dense.numpy().tobytes() + state.absmax.numpy().tobytes())
print(h.hexdigest(), "torch._dynamo" in sys.modules)
"""


def run(mode):
    out = subprocess.run([sys.executable, "-c", RUN, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    digest, dynamo = out.stdout.split()
    return digest, dynamo == "True"


def test_kernels_run_without_dynamo_and_give_the_same_bytes():
    ours, ours_dynamo = run("adaptkit")
    plain, _ = run("plain")
    assert not ours_dynamo
    assert ours == plain


def test_compile_on_first_call_compiles_once_with_the_same_arguments():
    calls = []

    def fake_compile(fn, **kw):
        calls.append((fn.__name__, kw))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    deferred = compile_on_first_call(fake_compile)

    @deferred(dynamic=False)
    def double(x):
        return 2 * x

    plain = deferred(lambda x: x + 1)
    assert calls == [] and double.__name__ == "double"
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert plain(1) == ("compiled", 2)
    assert calls == [("double", {"dynamic": False}), ("<lambda>", {})]


def test_disable_dynamo_goes_through_torch_once_dynamo_is_loaded(monkeypatch):
    wrapped = []

    def fake_disable(fn, recursive=True):
        wrapped.append(recursive)
        return lambda *a, **k: ("disabled", fn(*a, **k))

    stand_in = disable_dynamo_once_loaded(fake_disable)
    add = stand_in(lambda a, b: a + b)
    neg = stand_in(recursive=False)(lambda a: -a)
    assert wrapped == [True, False]
    monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    assert add(1, 2) == 3 and neg(1) == -1
    monkeypatch.setitem(sys.modules, "torch._dynamo", object())
    assert add(1, 2) == ("disabled", 3) and neg(1) == ("disabled", -1)


PRELOAD = """
import sys
from adaptkit.bnb_import import preload
preload()
print("torch._dynamo" in sys.modules)
import peft
from peft.tuners.lora.bnb import Linear4bit  # peft found the bitsandbytes preload() imported
print(sys.modules["bitsandbytes"].__name__)
"""


def test_preload_imports_bitsandbytes_without_dynamo_for_peft_to_find():
    out = subprocess.run([sys.executable, "-c", PRELOAD], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "bitsandbytes"]


def test_preload_does_without_bitsandbytes_when_it_cannot_be_imported(monkeypatch):
    from adaptkit import bnb_import
    from adaptkit.errors import AdaptkitError

    def broken():
        raise AdaptkitError("bitsandbytes is needed for 4-bit models but cannot be imported: no")

    monkeypatch.setattr(bnb_import, "functional", broken)
    assert bnb_import.preload() is None
