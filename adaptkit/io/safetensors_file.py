"""The safetensors format at byte level: header reading and a streaming writer.

The format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`` padded with spaces, then the raw little-endian tensor bytes; offsets are relative to
the end of the header.

Why our own code next to the safetensors package: its writer needs every tensor in memory at once,
and its reader memory-maps whole files (the mapped pages count in the process's resident memory)
and cannot read into a caller's (pinned) buffer. Reading the header ourselves gives each tensor's
file offset, so a merge can stream: read one tensor with ``pread`` into a reusable buffer, copy
untouched tensors file-to-file in the kernel, and write the output header first, then the bytes.
Tests read everything back with the safetensors package.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdaptkitError
from .files import open_regular, os_error

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
                     ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors package refuses headers above 100 MB too


@functools.lru_cache(maxsize=None)
def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def numel(shape) -> int:
    return math.prod(map(int, shape))  # called ~15 times per tensor of an MoE stream: kept in C


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


@dataclass
class Header:
    path: Path
    tensors: list[TensorInfo]  # in the order their bytes appear in the file
    metadata: dict[str, str]
    data_start: int


def _unique_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _uint(x) -> bool:
    return type(x) is int and x >= 0  # not bool, not float: what the format's usize fields accept


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header; raise AdaptkitError on anything malformed.

    As strict as the safetensors library itself: a regular file, a header of at most 100 MB that is a
    UTF-8 JSON object without duplicate keys, ``__metadata__`` a map of strings, every tensor a known
    dtype, a shape of non-negative integers and two offsets, and the tensors' byte ranges, sorted,
    covering the data section exactly (no gap, no overlap, nothing after the last one).
    """
    path = Path(path)
    fd = open_regular(path, "safetensors file")
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise AdaptkitError("not a safetensors file (shorter than 8 bytes)", path)
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or n > size - 8:
            raise AdaptkitError(f"not a valid safetensors file (header length {n} for a {size}-byte file)", path)
        raw = bytearray(n)
        read_into(fd, 8, memoryview(raw), path)
    except OSError as e:
        raise os_error(e, path) from None
    finally:
        os.close(fd)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        if not isinstance(obj, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdaptkitError(f"not a valid safetensors file (corrupt header: {e})", path) from None
    data_start = 8 + n
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdaptkitError("not a valid safetensors file (__metadata__ must map names to strings)", path)
    tensors = []
    for name, entry in obj.items():
        if not isinstance(entry, dict):
            raise AdaptkitError(f"tensor {name!r} has a malformed header entry", path)
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise AdaptkitError(f"tensor {name!r} has an unsupported or missing dtype {dtype_name!r}", path)
        if not isinstance(shape, list) or not all(_uint(s) for s in shape):
            raise AdaptkitError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}",
                                path)
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(x) for x in offsets):
            raise AdaptkitError(f"tensor {name!r}: data_offsets must be two non-negative integers, got {offsets!r}",
                                path)
        dtype, (begin, end) = DTYPES[dtype_name], offsets
        nbytes = numel(shape) * itemsize(dtype)
        if end < begin or end - begin != nbytes:
            raise AdaptkitError(f"tensor {name!r}: offsets do not match its shape and dtype", path)
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, nbytes))
    tensors.sort(key=lambda t: (t.offset, t.nbytes))
    at = data_start
    for t in tensors:
        if t.offset != at:
            what = "overlaps the tensor before it" if t.offset < at else "leaves a gap before it"
            raise AdaptkitError(f"not a valid safetensors file (tensor {t.name!r} {what})", path)
        at += t.nbytes
    if at != size:
        if at > size:
            last = tensors[-1].name
            raise AdaptkitError(f"truncated: tensor {last!r} ends at byte {at} but the file has {size}", path)
        raise AdaptkitError(f"not a valid safetensors file ({size - at} bytes after the last tensor)", path)
    return Header(path, tensors, dict(metadata), data_start)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_into(fd: int, offset: int, buf: memoryview, path: str | Path | None = None) -> None:
    """Fill ``buf`` from file descriptor ``fd`` at ``offset`` (no seek, thread-safe)."""
    done = 0
    total = len(buf)
    while done < total:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise AdaptkitError(f"unexpected end of file at byte {offset + done} (was it changed while being read?)",
                                path)
        done += got


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> tuple[bytes, list[int]]:
    """Serialise a header for tensors laid out in the given order; return it and each tensor's size."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    sizes = []
    for name, dtype, shape in entries:
        nbytes = numel(shape) * itemsize(dtype)
        obj[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


WRITEBACK_EVERY = 64 << 20
COPY_CHUNK = 8 << 20  # the read/write copy's buffer, where the kernel cannot copy


class _OutputFile:
    """An output file opened unbuffered; ``_finish`` syncs it to disk, ``abort`` closes it unfinished.

    Writes are handed to the disk as they go (:meth:`_written`): left alone, the kernel keeps them
    dirty in memory until gigabytes have piled up, and the final ``fsync`` then writes the whole
    file after all reading is over, read time and write time in series.
    """

    def _open(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "wb", buffering=0)
        self._fd = self._f.fileno()
        self._handed = 0  # bytes from the start already handed to the disk
        self._kernel_copy = True  # copy_file_range until it is refused
        self._copy_buf: memoryview | None = None  # the read/write copy's buffer, made on first use

    def _written(self) -> None:
        """Every WRITEBACK_EVERY bytes, start writing back what was written so far (asynchronously).

        ``POSIX_FADV_DONTNEED`` starts writeback of the range's dirty pages without waiting, and
        drops the pages already on disk: the output does not crowd out the page cache either.
        """
        end = self.bytes_written
        if end - self._handed >= WRITEBACK_EVERY and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fd, self._handed, end - self._handed, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            self._handed = end

    def _finish(self, sync: bool) -> None:
        if sync:
            os.fsync(self._fd)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()

    def _write_all(self, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            done += os.write(self._fd, mv[done:])

    def _copy_in(self, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` of another file to this file's position, by the kernel where it can.

        Where it cannot (the base on another file system: EXDEV; another OS) the file stops asking
        and copies through one reused buffer of :data:`COPY_CHUNK` (a fresh 64 MB buffer per chunk
        measured 0.3–0.8 GB/s into the page cache, a reused 8 MB one 1.5–3.5 GB/s)."""
        done = 0
        while done < nbytes:
            n = 0
            if self._kernel_copy:
                try:
                    n = os.copy_file_range(src_fd, self._fd, nbytes - done, src_offset + done)
                except (OSError, AttributeError):
                    self._kernel_copy = False
                    n = 0
            if n <= 0:  # read and write
                if self._copy_buf is None:
                    self._copy_buf = memoryview(bytearray(COPY_CHUNK))
                buf = self._copy_buf
                chunk = min(nbytes - done, COPY_CHUNK)
                read_into(src_fd, src_offset + done, buf[:chunk])
                self._write_all(buf[:chunk])
                n = chunk
            done += n


class StreamingWriter(_OutputFile):
    """Write a safetensors file tensor by tensor, in a fixed order declared up front.

    The header is written first (all names, dtypes and shapes are known before any data), then each
    tensor's bytes as they arrive, so no more than one tensor is ever held. ``close`` checks that
    every declared tensor was written in full.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header, sizes = build_header(entries, metadata)
        self._expected = [(name, size) for (name, _, _), size in zip(entries, sizes)]
        self._next = 0
        self._open(path)
        try:
            self._write_all(memoryview(header))
        except BaseException:
            self.abort()
            raise
        self.bytes_written = len(header)

    def _advance(self, name: str, nbytes: int) -> None:
        if self._next >= len(self._expected):
            raise RuntimeError(f"{self.path}: tensor {name!r} was not declared")
        exp_name, exp_size = self._expected[self._next]
        if name != exp_name or nbytes != exp_size:
            raise RuntimeError(f"{self.path}: expected {exp_name!r} ({exp_size} bytes), got {name!r} ({nbytes} bytes)")
        self._next += 1
        self.bytes_written += nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor.detach().cpu())
        self._advance(name, len(data))
        self._write_all(data)
        self._written()

    def write_block(self, sizes: list[tuple[str, int]], data: memoryview) -> None:
        """Write several consecutive tensors at once: ``data`` holds them back to back, ``sizes`` names
        each and its byte count (in order), one ``write`` for all."""
        if sum(n for _, n in sizes) != len(data):
            raise RuntimeError(f"{self.path}: a block of {len(data)} bytes for {sum(n for _, n in sizes)}")
        for name, nbytes in sizes:
            self._advance(name, nbytes)
        self._write_all(data)
        self._written()

    def copy_from(self, name: str, src_fd: int, src_offset: int, nbytes: int, dtype=None, shape=None) -> None:
        """Copy ``nbytes`` from another file without passing them through user memory."""
        self._advance(name, nbytes)
        self._copy_in(src_fd, src_offset, nbytes)
        self._written()

    def close(self, sync: bool = True) -> None:
        if self._f.closed:
            return
        try:
            if self._next != len(self._expected):
                missing = [n for n, _ in self._expected[self._next:]]
                raise RuntimeError(f"{self.path}: {len(missing)} declared tensors never written: {missing[:3]}")
            self._finish(sync)
        finally:
            self._f.close()


class ReservedHeaderWriter(_OutputFile):
    """Write a safetensors file whose tensor sizes are only known as they are written.

    A header region of ``reserve`` bytes is left blank at the start; tensors stream in after it;
    ``close`` writes the real header there, padded with spaces to exactly the reserved length (the
    format allows trailing spaces). Used where a tensor's size is not known up front, such as the
    JSON blob of a requantized bitsandbytes layer.
    """

    def __init__(self, path: str | Path, names: list[str], reserve: int, metadata: dict[str, str] | None = None):
        self._names = list(names)
        self._metadata = metadata
        self._reserve = reserve + (-reserve % 8)
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._offset = 0
        self._open(path)
        try:
            os.pwrite(self._fd, b" " * (8 + self._reserve), 0)
        except BaseException:
            self.abort()
            raise
        self.bytes_written = 8 + self._reserve

    def _next_name(self, name: str) -> None:
        expected = self._names[len(self._entries)] if len(self._entries) < len(self._names) else None
        if name != expected:
            raise RuntimeError(f"{self.path}: expected {expected!r}, got {name!r}")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._next_name(name)
        data = tensor_bytes(tensor.detach().cpu())
        done = 0
        base = 8 + self._reserve + self._offset
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], base + done)
        self._entries[name] = (tensor.dtype, tuple(tensor.shape), self._offset, self._offset + len(data))
        self._offset += len(data)
        self.bytes_written += len(data)
        self._written()

    def copy_from(self, name: str, src_fd: int, src_offset: int, nbytes: int, dtype: torch.dtype, shape) -> None:
        self._next_name(name)
        os.lseek(self._fd, 8 + self._reserve + self._offset, os.SEEK_SET)
        self._copy_in(src_fd, src_offset, nbytes)
        self._entries[name] = (dtype, tuple(shape), self._offset, self._offset + nbytes)
        self._offset += nbytes
        self.bytes_written += nbytes
        self._written()

    def close(self, sync: bool = True) -> None:
        if self._f.closed:
            return
        try:
            if len(self._entries) != len(self._names):
                raise RuntimeError(f"{self.path}: {len(self._names) - len(self._entries)} tensors never written")
            obj: dict = {}
            if self._metadata:
                obj["__metadata__"] = {str(k): str(v) for k, v in self._metadata.items()}
            for name in self._names:
                dtype, shape, begin, end = self._entries[name]
                obj[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
            raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
            if len(raw) > self._reserve:
                raise RuntimeError(f"{self.path}: header of {len(raw)} bytes exceeds the {self._reserve} reserved")
            raw += b" " * (self._reserve - len(raw))
            os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
            self._finish(sync)
        finally:
            self._f.close()


def header_reserve(names: list[str], metadata: dict[str, str] | None, max_ndim: int = 4) -> int:
    """A safe upper bound on the header size for ``names`` (dtype, shape and offsets at their widest)."""
    per = len('"":{"dtype":"F8_E4M3","shape":[],"data_offsets":[,]},') + max_ndim * 21 + 2 * 21
    meta = len(json.dumps(metadata or {})) + 32
    return 64 + meta + sum(len(json.dumps(n)) + per for n in names)
