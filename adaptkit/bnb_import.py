"""Import bitsandbytes without paying for torch._dynamo, which a merge never uses.

Two things in bitsandbytes 0.4x–0.50 import torch._dynamo (with inductor, triton and sympy: about
1,500 modules, 13 s on the H100 machine, where all of ``adaptkit merge --quantize nf4`` on a
7B model takes less; docs/benchmarks.md):

1. At import, a few pure-PyTorch fallback kernels are wrapped in ``torch.compile``, and calling
   ``torch.compile`` imports torch._dynamo at once.
2. Its kernels are registered with ``torch.library.register_kernel``, which wraps each in
   ``torch._disable_dynamo``; that wrapper imports torch._dynamo on the first call of each kernel,
   only to run it with dynamo's frame hook switched off.

While bitsandbytes is imported, both are replaced by stand-ins that keep their meaning:
``torch.compile(fn, **kw)`` becomes a wrapper that makes the same call on first use (so the
fallbacks compile, or fall back, as bitsandbytes intends, only later), and a kernel runs directly
while torch._dynamo has never been imported (then nothing can be compiling, and disabling dynamo
changes nothing), through torch's own wrapper once it has. Both are put back right after the
import. With a torch that lacks either hook, bitsandbytes is imported as it is.
"""

from __future__ import annotations

import functools
import sys

import torch

from .errors import AdaptkitError


def functional():
    """``bitsandbytes.functional``, imported as described above (once per process)."""
    if "bitsandbytes.functional" in sys.modules:
        return sys.modules["bitsandbytes.functional"]
    saved = {}
    if "torch._dynamo" not in sys.modules:  # otherwise there is nothing left to save
        for name, stand_in in (("compile", compile_on_first_call), ("_disable_dynamo", disable_dynamo_once_loaded)):
            real = getattr(torch, name, None)
            if real is not None:
                saved[name] = real
                setattr(torch, name, stand_in(real))
    try:
        import bitsandbytes.functional as F
    except ImportError as e:  # pragma: no cover - a dependency
        raise AdaptkitError(f"bitsandbytes is needed for 4-bit models but cannot be imported: {e}") from None
    finally:
        for name, real in saved.items():
            setattr(torch, name, real)
    return F


def preload() -> None:
    """Import bitsandbytes as :func:`functional` does before a library that imports it its own way
    (peft imports it whenever it is installed, and with it torch._dynamo: 1-3 s of ``adaptkit verify``
    on a 2-core CPU, docs/benchmarks.md); nothing when it cannot be imported (that library then does
    without it, as it would have)."""
    try:
        functional()
    except AdaptkitError:
        pass


def compile_on_first_call(compile_fn):
    """A stand-in for ``torch.compile`` that calls ``compile_fn`` with the same arguments on first use."""

    def deferred(model=None, **kwargs):
        if model is None:  # used as @torch.compile(**kwargs)
            return lambda fn: deferred(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **kwargs)
            return compiled(*args, **kw)

        return call

    return deferred


def disable_dynamo_once_loaded(disable_fn):
    """A stand-in for ``torch._disable_dynamo``: ``disable_fn``'s wrapper only once torch._dynamo is loaded."""

    def stand_in(fn=None, recursive: bool = True):
        if fn is None:  # used as @torch._disable_dynamo(recursive=...)
            return functools.partial(stand_in, recursive=recursive)
        guarded = disable_fn(fn, recursive)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            return guarded(*args, **kwargs)

        return call

    return stand_in
