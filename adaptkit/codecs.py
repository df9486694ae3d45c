"""How a stored tensor becomes fp32 and back: the decoders and encoders of a merge.

A merge job is decode → operations (:mod:`.ops`) → encode. A decoder reads a base tensor (and its
companions) and fills an fp32 buffer; an encoder turns the fp32 result into what is written. A new
storage format is a new codec here, not a new branch in the merge.

Decoders: :class:`DenseRead` (a tensor as stored), :class:`NoRead` (none: replaced whole, in
another shape), :class:`FourBitRead` (a bitsandbytes NF4/FP4
weight and its components, dequantized by bitsandbytes), :class:`QLoRARead` (a dense weight seen
through its 4-bit round trip, as QLoRA training saw it), :class:`ScaledRead` (an FP8 or MXFP4
weight and its scales, :mod:`.scaled`). Encoders: :class:`DenseWrite` (round once to a dtype),
:class:`FourBitWrite` (quantize with bitsandbytes, components included), :class:`ScaledWrite`
(quantize into the base's FP8 or MXFP4 layout).

Some codecs measure the error they add against the exact fp32 result (``error``); the merge
reports it per layer under the codec's ``label``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .io.safetensors_file import itemsize, numel
from . import scaled
from .quant import QuantizedWeight, QuantSettings, dequantize, quantize, relative_error


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


# -------------------------------------------------------------------------------------------- decoders

@dataclass(frozen=True)
class DenseRead:
    """A tensor as stored, in ``dtype``."""

    dtype: torch.dtype
    label = None

    def names(self, name: str) -> list[str]:
        return [name]

    def nbytes(self, shape) -> int:
        return numel(shape) * itemsize(self.dtype)

    def read(self, ckpt, name: str, buf: torch.Tensor):
        """In the reader thread: the stored bytes, into ``buf`` (a reusable, pinned on CUDA, buffer)."""
        return ckpt.read(name, out=buf)

    def decode(self, data, w32: torch.Tensor, device: torch.device):
        """Fill ``w32`` (fp32, on ``device``) from what :meth:`read` returned; return state for :meth:`error`."""
        w32.copy_(data, non_blocking=device.type == "cuda")
        _sync(device)  # the read buffer is reused as soon as this returns
        return None

    def error(self, w32: torch.Tensor, state) -> float | None:
        return None

    def load(self, ckpt, name: str, device="cpu") -> torch.Tensor:
        """The dense tensor, outside a stream (verify)."""
        return ckpt.read(name)

    def passes_through(self, encoder) -> bool:
        """Whether the stored bytes are already what ``encoder`` writes (then they are copied)."""
        return type(self) is DenseRead and type(encoder) is DenseWrite and encoder.dtype == self.dtype \
            and not encoder.measure


@dataclass(frozen=True)
class NoRead(DenseRead):
    """Nothing read: a tensor the adapter replaces with one of another shape (a vocabulary the
    fine-tune grew, saved whole), whose first operation writes every value."""

    def names(self, name: str) -> list[str]:
        return []

    def nbytes(self, shape) -> int:
        return 0

    def read(self, ckpt, name: str, buf: torch.Tensor):
        return None

    def decode(self, data, w32: torch.Tensor, device: torch.device):
        return None

    def load(self, ckpt, name: str, device="cpu") -> torch.Tensor:
        return ckpt.read(name)


@dataclass(frozen=True)
class FourBitRead(DenseRead):
    """A bitsandbytes 4-bit weight: the packed tensor and its components, dequantized by bitsandbytes."""

    quant: QuantizedWeight | None = None

    def names(self, name: str) -> list[str]:
        return [name, *self.quant.components]

    def nbytes(self, shape) -> int:
        return numel(shape) // 2 + 1  # packed: two values a byte (an estimate, components aside)

    def read(self, ckpt, name: str, buf: torch.Tensor):
        comps = {c[len(name) + 1:]: ckpt.read(c).clone() for c in self.quant.components}
        return ckpt.read(name, out=buf), comps

    def decode(self, data, w32: torch.Tensor, device: torch.device):
        packed, comps = data
        w32.copy_(dequantize(packed, comps, device))
        _sync(device)
        return None

    def load(self, ckpt, name: str, device="cpu") -> torch.Tensor:
        comps = {c[len(name) + 1:]: ckpt.read(c).clone() for c in self.quant.components}
        return dequantize(ckpt.read(name).clone(), comps, device)


@dataclass(frozen=True)
class QLoRARead(DenseRead):
    """A dense weight through its 4-bit round trip (quantize, dequantize): the base QLoRA trained on.

    The error reported is how far this merge lies from a plain one, ‖W − Wq‖ / ‖W + ΔW‖.
    """

    settings: QuantSettings | None = None
    target: QuantizedWeight | None = None
    measure: bool = False  # keep W − Wq to report the error (when the tensor is merged)
    label = "merged on the 4-bit round trip of the base (vs a plain merge)"

    def decode(self, data, w32: torch.Tensor, device: torch.device):
        super().decode(data, w32, device)
        st = self.settings
        packed, comps = quantize(w32.to(self.dtype).float(), self.target, st.double_quant, st.storage)
        plain = w32.clone() if self.measure else None
        w32.copy_(dequantize(packed, comps, device))
        return plain.sub_(w32) if plain is not None else None

    def error(self, w32: torch.Tensor, state) -> float | None:
        if state is None:
            return None
        return float(state.double().norm() / (w32.double() + state.double()).norm().clamp(min=1e-30))


@dataclass(frozen=True)
class ScaledRead(DenseRead):
    """An FP8 or MXFP4 weight (:class:`adaptkit.scaled.ScaledWeight`): its low-precision data read
    into the stream's buffer, its scales beside it, dequantized in fp32 on the device."""

    weight: scaled.ScaledWeight | None = None

    def names(self, name: str) -> list[str]:
        return list(self.weight.stored)

    def nbytes(self, shape) -> int:
        return numel(self.stored_shape) * itemsize(self.dtype)  # the data (the scales are small)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        w = self.weight
        return w.shape if w.style != "mxfp4" else (*w.shape[:-2], w.shape[-1], w.shape[-2] // 32, 16)

    def read(self, ckpt, name: str, buf: torch.Tensor):
        return ckpt.read(self.weight.data, out=buf), ckpt.read(self.weight.scales).clone()

    def decode(self, data, w32: torch.Tensor, device: torch.device):
        q, s = data
        scaled.dequantize_(self.weight, q, s, w32)
        _sync(device)
        return None

    def load(self, ckpt, name: str, device="cpu") -> torch.Tensor:
        out = torch.empty(self.weight.shape, dtype=torch.float32, device=device)
        return scaled.dequantize_(self.weight, ckpt.read(self.weight.data), ckpt.read(self.weight.scales), out)

    def requantized(self, w32: torch.Tensor) -> torch.Tensor:
        """``w32`` through this format's quantizer and back: the error any merge in it must carry."""
        q = scaled.quantize(self.weight, w32)
        return scaled.dequantize_(self.weight, q[self.weight.data], q[self.weight.scales], torch.empty_like(w32))


# -------------------------------------------------------------------------------------------- encoders

@dataclass(frozen=True)
class DenseWrite:
    """Round the fp32 result once to ``dtype``. ``measure``: report that rounding's relative error (a
    merge of a 4-bit base into a dense model, where it is the whole error)."""

    dtype: torch.dtype
    measure: bool = False
    variable = False  # the size is known before writing
    label = "rounded to the output dtype"

    def names(self, name: str) -> list[str]:
        return [name]

    def nbytes(self, shape) -> int:
        return numel(shape) * itemsize(self.dtype)

    @property
    def result_dtype(self) -> torch.dtype:
        """The dtype a reader of the output computes with (values beyond it fail the merge)."""
        return self.dtype

    def encode(self, name: str, shape, w32: torch.Tensor, device: torch.device, take_buffer):
        """Return (buffer to give back after writing, [(name, tensor)], error or None)."""
        host = take_buffer()
        view = host[: self.nbytes(shape)].view(self.dtype).view(shape)
        view.copy_(w32, non_blocking=device.type == "cuda")
        _sync(device)
        err = relative_error(view.to(device) if device.type == "cuda" else view, w32) if self.measure else None
        return host, [(name, view)], err


@dataclass(frozen=True)
class FourBitWrite:
    """Quantize the fp32 result with bitsandbytes into ``target``'s format (its components written
    beside it); the error reported is the requantization's, against the exact merge."""

    target: QuantizedWeight
    double_quant: bool
    storage: torch.dtype
    variable = True  # the components' sizes are known only once quantized
    label = "requantized to 4-bit"

    def names(self, name: str) -> list[str]:
        return [name, *self.target.components]

    def nbytes(self, shape) -> int:
        return numel(shape) // 2 + 1

    @property
    def result_dtype(self) -> torch.dtype:
        return self.target.dtype  # what bitsandbytes dequantizes to

    def encode(self, name: str, shape, w32: torch.Tensor, device: torch.device, take_buffer):
        from .errors import AdaptkitError

        packed, comps = quantize(w32, self.target, self.double_quant, self.storage)
        expected = {c[len(name) + 1:] for c in self.target.components}
        if set(comps) != expected:
            raise AdaptkitError(f"{name}: requantizing gave components {sorted(comps)}, expected {sorted(expected)}")
        err = relative_error(dequantize(packed, comps, device), w32)
        items = [(name, packed.cpu())] + [(c, comps[c[len(name) + 1:]].cpu()) for c in self.target.components]
        return None, items, err


@dataclass(frozen=True)
class ScaledWrite:
    """Quantize the fp32 result into the base weight's own FP8 or MXFP4 layout (its block size and
    scale dtype) with the format's quantizer; the error reported is that requantization's, against
    the exact merge."""

    weight: scaled.ScaledWeight
    variable = True  # written with its scales by the reserved-header writer
    measure = False

    @property
    def label(self) -> str:
        return f"requantized to {self.weight.label}"

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.weight.style == "mxfp4" else scaled.FP8

    def names(self, name: str) -> list[str]:
        return list(self.weight.stored)

    def nbytes(self, shape) -> int:
        return numel(shape) // (2 if self.weight.style == "mxfp4" else 1)

    @property
    def result_dtype(self) -> torch.dtype:
        return torch.float32  # scales adapt to any finite value

    def encode(self, name: str, shape, w32: torch.Tensor, device: torch.device, take_buffer):
        w = self.weight
        stored, err = scaled.quantize(w, w32, measure=True)
        return None, [(n, stored[n].cpu()) for n in w.stored], err
