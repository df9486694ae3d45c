"""adaptkit/plan.py: what each output tensor becomes, decided before a byte is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import adaptkit
from adaptkit.codecs import DenseRead, DenseWrite, FourBitRead, FourBitWrite, QLoRARead
from adaptkit.errors import AdaptkitError
from adaptkit.io.checkpoint import Checkpoint
from adaptkit.plan import layout_shards, parse_size, plan_merge
from helpers import ADAPTERS, TINY_GPT2, TINY_LLAMA, load_dir


def _plan(base, *adapters, **kw):
    return plan_merge(Checkpoint.open(base), [adaptkit.load_adapter(a) for a in adapters], **kw)


def test_a_dense_plan_copies_what_no_adapter_touches():
    plan = _plan(TINY_LLAMA, ADAPTERS["llama-lora"])
    jobs = {j.name: j for j in plan.jobs}
    assert set(jobs) == set(load_dir(TINY_LLAMA)) and len(plan.jobs) == len(jobs)
    touched = {n for n, j in jobs.items() if j.ops}
    assert len(touched) == 14 == plan.modules_merged
    for name, job in jobs.items():
        assert type(job.decoder) is DenseRead and type(job.encoder) is DenseWrite
        assert job.decoder.dtype == job.encoder.dtype == torch.float16
        assert job.computed == (name in touched)  # untouched: copied file to file
        assert [op.kind for op in job.ops] == (["lora"] if name in touched else [])
    ck = Checkpoint.open(TINY_LLAMA)
    assert [s.file for s in plan.shards] == [s.path.name for s in ck.shards]  # the base's layout, kept
    assert [[j.name for j in s.jobs] for s in plan.shards] == [[t.name for t in s.tensors] for s in ck.shards]
    assert plan.write_index and not plan.variable_sizes


def test_a_dtype_makes_every_float_tensor_computed():
    plan = _plan(TINY_LLAMA, ADAPTERS["llama-lora"], dtype="bfloat16")
    assert all(j.computed and j.encoder.dtype == torch.bfloat16 for j in plan.jobs)
    assert plan.config["dtype"] == "bfloat16"


def test_conv1d_layers_are_transposed_whatever_the_config_says(tmp_path):
    plan = _plan(TINY_GPT2, ADAPTERS["gpt2-lora"])
    lora_ops = [op for j in plan.jobs for op in j.ops if op.kind == "lora"]
    assert lora_ops and all(op.transposed for op in lora_ops)
    flipped = tmp_path / "llama-flagged"
    shutil.copytree(ADAPTERS["llama-lora"], flipped)
    cfg = json.loads((flipped / "adapter_config.json").read_text())
    (flipped / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    plan = _plan(TINY_LLAMA, flipped)
    assert not any(op.transposed for j in plan.jobs for op in j.ops)  # nn.Linear: peft ignores the flag
    assert any("fan_in_fan_out is true" in w and "nn.Linear" in w for w in plan.warnings)


def test_a_tied_embedding_changed_by_an_adapter_is_written_twice(variants):
    plan = _plan(variants["gpt2-fp32"], variants["gpt2-embed"])
    head = [j for j in plan.jobs if j.name == "lm_head.weight"]
    assert len(head) == 1 and head[0].source == "transformer.wte.weight"
    assert plan.config["tie_word_embeddings"] is False


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "base"
    adaptkit.merge(TINY_LLAMA, ADAPTERS["llama-lora"], out, quantize="nf4")
    return out


def test_a_4bit_base_is_read_by_its_codec(nf4_base):
    dense = _plan(nf4_base, ADAPTERS["llama-lora"])
    merged = [j for j in dense.jobs if j.ops]
    assert merged and all(isinstance(j.decoder, FourBitRead) and type(j.encoder) is DenseWrite for j in merged)
    assert all(j.encoder.measure for j in merged)  # the rounding is reported
    assert not any(n.endswith(".absmax") for j in dense.jobs for n in j.out_names)  # components dropped
    assert "quantization_config" not in dense.config
    kept = _plan(nf4_base, ADAPTERS["llama-lora"], quantize="nf4")
    merged = [j for j in kept.jobs if j.ops]
    assert all(isinstance(j.encoder, FourBitWrite) for j in merged) and kept.variable_sizes
    assert any(n.endswith(".absmax") for j in merged for n in j.out_names)  # written beside the weight
    assert "quantization_config" in kept.config
    with pytest.raises(AdaptkitError, match="qlora is for dense bases"):
        _plan(nf4_base, ADAPTERS["llama-lora"], qlora=True)


def test_qlora_round_trips_the_linear_weights_only():
    plan = _plan(TINY_LLAMA, ADAPTERS["llama-lora"], qlora=True)
    by_kind = {type(j.decoder) for j in plan.jobs}
    assert by_kind == {DenseRead, QLoRARead}
    for j in plan.jobs:
        linear = j.name.endswith("_proj.weight")
        assert isinstance(j.decoder, QLoRARead) == linear, j.name


def test_layout_shards_cuts_at_the_limit():
    plan = _plan(TINY_LLAMA, ADAPTERS["llama-lora"])
    sizes = [j.out_bytes for j in plan.jobs]
    shards, index = layout_shards(plan.jobs, 50_000)
    assert index and len(shards) > 2
    assert [j for s in shards for j in s.jobs] == plan.jobs
    for s in shards:
        total = sum(j.out_bytes for j in s.jobs)
        assert total <= 50_000 or len(s.jobs) == 1
    one, index = layout_shards(plan.jobs, 10 * sum(sizes))
    assert [s.file for s in one] == ["model.safetensors"] and not index


@pytest.mark.parametrize("text, value", [("5GB", 5 * 10 ** 9), ("2GiB", 2 << 30), ("500 mb", 5 * 10 ** 8),
                                         ("1.5KB", 1500), ("1000", 1000), (7, 7)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "0.0.1GB", "GB", "5iB", "1e9", True, 1.5])
def test_parse_size_refuses(text):
    with pytest.raises(AdaptkitError):
        parse_size(text)


@pytest.mark.parametrize("limit", [0, 1 << 14, 1 << 20])
def test_small_tensors_travel_in_runs_and_write_the_same_bytes(tmp_path, monkeypatch, limit):
    import adaptkit.stream as stream

    monkeypatch.setattr(stream, "BATCH_BYTES", limit)
    plan = _plan(TINY_LLAMA, ADAPTERS["llama-lora"], dtype="bfloat16")
    shard_of = {id(j): s for s in plan.shards for j in s.jobs}
    runs = stream.batches(plan.jobs, shard_of)
    assert [j for r in runs for j in r] == plan.jobs
    for r in (r for r in runs if len(r) > 1):
        assert all(j.computed and type(j.decoder) is DenseRead and type(j.encoder) is DenseWrite for j in r)
        assert len({id(shard_of[id(j)]) for j in r}) == 1
        assert sum(j.in_bytes for j in r) <= limit and sum(j.out_bytes for j in r) <= limit
        starts = [sum(j.out_bytes for j in r[:k]) for k in range(len(r))]
        assert all(s % 8 == 0 for s in starts)
    assert (max(map(len, runs)) > 1) == (limit > 0)
    adaptkit.merge(TINY_LLAMA, ADAPTERS["llama-lora"], tmp_path / "out", dtype="bfloat16")
    monkeypatch.setattr(stream, "BATCH_BYTES", 0)  # every tensor alone
    adaptkit.merge(TINY_LLAMA, ADAPTERS["llama-lora"], tmp_path / "alone", dtype="bfloat16")
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files and all((tmp_path / "out" / f).read_bytes() == (tmp_path / "alone" / f).read_bytes() for f in files)
