"""Property-based tests (hypothesis): malformed base shards and adapter configs, generated.

Whatever the input, a merge ends in one of two ways: exit 2 with exactly one line on stderr, or
exit 0 with a result the reference agrees with. The references are the libraries themselves:
the safetensors package decides whether a shard is valid (adaptkit may be stricter, never laxer),
and peft decides what an adapter config means (whatever adaptkit merges, peft must load and merge
to the same tensors). Inputs never change; nothing is left beside the output. Examples are
derandomized, so every run of the suite checks the same cases.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from helpers import (
    ADAPTERS,
    TINY_LLAMA,
    assert_merge_close,
    assert_one_line_error,
    invoke,
    listing,
    load_dir,
    peft_merged,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import build

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 66, 2 ** 66) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)

DTYPE_NAMES = ["F16", "BF16", "F32", "F64", "I8", "U8", "BOOL", "I64", "F8_E4M3", "F4", "f16", "float16", ""]
near_ints = st.integers(-3, 300)

# ------------------------------------------------------------------------------------ base shards

mutations = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 50), st.just("dtype"), st.sampled_from(DTYPE_NAMES) | json_values),
    st.tuples(st.just("field"), st.integers(0, 50), st.just("shape"),
              st.lists(near_ints, max_size=3) | json_values),
    st.tuples(st.just("field"), st.integers(0, 50), st.just("data_offsets"),
              st.lists(st.integers(-8, 200_000), min_size=0, max_size=3) | json_values),
    st.tuples(st.just("shift"), st.integers(0, 50), st.integers(-16, 16)),
    st.tuples(st.just("swap"), st.integers(0, 50), st.integers(0, 50)),
    st.tuples(st.just("drop"), st.integers(0, 50)),
    st.tuples(st.just("duplicate"), st.integers(0, 50)),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("header_length"), st.integers(0, 2 ** 64 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, 200_000)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("garbage"), st.binary(max_size=48)),
)


def _mutate(raw: bytes, mutation) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    kind, *args = mutation
    text = None
    if kind == "field":
        i, field, value = args
        header[names[i % len(names)]][field] = value
    elif kind == "shift":
        i, by = args
        entry = header[names[i % len(names)]]
        entry["data_offsets"] = [x + by for x in entry["data_offsets"]]
    elif kind == "swap":
        a, b = names[args[0] % len(names)], names[args[1] % len(names)]
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif kind == "drop":
        del header[names[args[0] % len(names)]]
    elif kind == "duplicate":
        name = names[args[0] % len(names)]
        text = json.dumps(header)[:-1] + ", " + json.dumps({name: header[name]})[1:]
    elif kind == "metadata":
        header["__metadata__"] = args[0]
    elif kind == "header_length":
        return struct.pack("<Q", args[0]) + raw[8:]
    elif kind == "truncate":
        return raw[: args[0] % len(raw)]
    elif kind == "append":
        return raw + args[0]
    elif kind == "garbage":
        body = args[0] + b" " * (-len(args[0]) % 8)
        return struct.pack("<Q", len(body)) + body + data
    text = text if text is not None else json.dumps(header)
    body = text.encode() + b" " * (-len(text.encode()) % 8)
    return struct.pack("<Q", len(body)) + body + data


def _safetensors_accepts(path) -> bool:
    """The reference: can the safetensors library open the file and read every tensor?"""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:  # noqa: BLE001 - any refusal of the library counts
        return False


def _workdir(tmp_path_factory, name, mutated, *copies):
    """A scratch folder with copies of ``copies`` (name, source): (its root, the file each example
    mutates, that file's original bytes)."""
    root = tmp_path_factory.mktemp(name)
    for sub, src in copies:
        shutil.copytree(src, root / sub)
    return root, root / mutated, (root / mutated).read_bytes()


@pytest.fixture(scope="module")
def shard_work(tmp_path_factory):
    return _workdir(tmp_path_factory, "shards", "base/model-00002-of-00002.safetensors", ("base", TINY_LLAMA),
                    ("lora", ADAPTERS["llama-lora"]))


@settings(max_examples=150, **SETTINGS)
@given(mutation=mutations)
def test_a_malformed_base_shard_is_one_line_or_a_valid_merge(runner, shard_work, mutation):
    root, shard, original = shard_work
    shard.write_bytes(_mutate(original, mutation))
    try:
        before = snapshot(root / "base", root / "lora")
        out = root / "out"
        res = invoke(runner, "merge", root / "base", root / "lora", "-o", out, "--device", "cpu", seconds=30)
        assert res.exit_code in (0, 2), (res.exit_code, res.output, res.exception)
        if res.exit_code == 2:
            assert_one_line_error(res)
            assert not out.exists()
        else:
            assert _safetensors_accepts(shard), "adaptkit accepted a shard the safetensors library refuses"
            for f in out.glob("*.safetensors"):
                assert _safetensors_accepts(f)
            shutil.rmtree(out)
        assert snapshot(root / "base", root / "lora") == before
        assert listing(root) == ["base", "lora"]
    finally:
        shard.write_bytes(original)


# -------------------------------------------------------------------------------- adapter configs

CONFIG_VALUES = {
    "r": st.sampled_from([8, 4, 16, 0, -8, True, 8.0, "8", None]) | json_values,
    "lora_alpha": st.sampled_from([16, 8, 0, -16, 1e-3, 1e30, True]) | st.floats() | json_values,
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj", "layers.1.mlp.down_proj", "(", ".*", "proj"]),
                                    st.sampled_from([8, 4, 2, 0, -1, 2.5, None]), max_size=2) | json_values,
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj", "[", "mlp.*", "o_proj"]),
                                     st.sampled_from([4, 16, 0, -2]) | st.floats(), max_size=2) | json_values,
    "use_rslora": st.sampled_from([True, False, None, "yes", 1]),
    "use_dora": st.sampled_from([True, False, None]),
    "fan_in_fan_out": st.sampled_from([True, False, None, 1]),
}
config_changes = st.lists(st.sampled_from(sorted(CONFIG_VALUES)), unique=True, min_size=1, max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: CONFIG_VALUES[k] for k in keys}))


@pytest.fixture(scope="module")
def config_work(tmp_path_factory):
    return _workdir(tmp_path_factory, "configs", "lora/adapter_config.json", ("lora", ADAPTERS["llama-lora"]))


@settings(max_examples=60, **SETTINGS)
@given(changes=config_changes)
def test_an_adapter_config_is_refused_or_merged_as_peft_merges_it(runner, config_work, changes):
    root, cfg_path, original = config_work
    original = original.decode()
    cfg_path.write_text(json.dumps({**json.loads(original), **changes}))
    try:
        out = root / "out"
        res = invoke(runner, "merge", TINY_LLAMA, root / "lora", "-o", out, "--device", "cpu")
        assert res.exit_code in (0, 2), (res.exit_code, res.output, res.exception)
        if res.exit_code == 2:
            assert_one_line_error(res)
            return
        ours = load_dir(out)
        shutil.rmtree(out)
        # null patterns crash peft's loader ('NoneType' has no keys); adaptkit reads them as "no pattern",
        # the one meaning they can have: peft is asked with that meaning
        nulls = {k: {} for k in ("rank_pattern", "alpha_pattern") if k in changes and changes[k] is None}
        cfg_path.write_text(json.dumps({**json.loads(original), **changes, **nulls}))
        try:
            _, merged = peft_merged(TINY_LLAMA, [root / "lora"], torch.float16)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"adaptkit merged an adapter peft refuses ({changes}): {type(e).__name__}: {e}")
        ref = merged.state_dict()
        base = build.load_model(TINY_LLAMA, dtype=torch.float16).state_dict()
        for name, t in ours.items():  # fp16 (the base's dtype): peft rounds twice, we once; 2 units apart at most
            assert_merge_close(t, ref[name].contiguous(), base[name], ulps=2.0, name=f"{name} with {changes}")
    finally:
        cfg_path.write_text(original)
        assert listing(root) == ["lora"]
