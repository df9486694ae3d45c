"""Never lose data, never hang, never merge silently wrong (issue 13).

Each case runs the CLI as a user would and checks: exit status 2 with exactly one line on stderr
(or a correct result), no input file changed, nothing left beside the output.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    ADAPTERS,
    TINY_GPT2,
    TINY_LLAMA,
    assert_one_line_error,
    copy_inputs,
    invoke,
    listing,
    load_dir,
    snapshot,
)
from safetensors.torch import load_file, save_file

import adaptkit
from adaptkit import merge
from adaptkit.errors import AdaptkitError


@pytest.fixture
def w(tmp_path):
    """Private copies of the fixtures (so a bug cannot damage the shipped ones) and their snapshot."""
    paths = copy_inputs({"base": TINY_LLAMA, "lora": ADAPTERS["llama-lora"], "dora": ADAPTERS["llama-dora"],
                         "gpt2": TINY_GPT2, "gpt2lora": ADAPTERS["gpt2-lora"]}, tmp_path)
    paths["root"] = tmp_path
    paths["before"] = snapshot(*(paths[k] for k in ("base", "lora", "dora", "gpt2", "gpt2lora")))
    return paths


def unchanged(w):
    assert snapshot(*(w[k] for k in ("base", "lora", "dora", "gpt2", "gpt2lora"))) == w["before"]


# ------------------------------------------------------------------------------ inputs are never written

@pytest.mark.parametrize("case", ["base", "base/.", "parent", "adapter", "cwd", "inside-base", "base-shard",
                                  "symlink-to-base", "combine-adapter", "convert-source", "convert-file-source"])
def test_an_input_is_never_written_even_with_force(runner, w, monkeypatch, case):
    root, base, lora = w["root"], w["base"], w["lora"]
    if case == "convert-file-source":
        raw = root / "lora.safetensors"
        assert invoke(runner, "convert", lora, "--to", "raw", "-o", raw).exit_code == 0
        before = snapshot(raw)
        res = invoke(runner, "convert", raw, "--to", "raw", "-o", raw, "--force")
        assert_one_line_error(res, "refusing to write the output here", "it is the input")
        assert snapshot(raw) == before
        unchanged(w)
        return
    args = {
        "base": ["merge", base, lora, "-o", base],
        "base/.": ["merge", base, lora, "-o", f"{base}/."],
        "parent": ["merge", base, lora, "-o", root],
        "adapter": ["merge", base, lora, "-o", lora],
        "cwd": ["merge", "base", "lora", "-o", "."],
        "inside-base": ["merge", base, lora, "-o", base / "merged"],
        "base-shard": ["merge", base, lora, "-o", base / "model-00001-of-00002.safetensors"],
        "symlink-to-base": ["merge", base, lora, "-o", root / "link"],
        "combine-adapter": ["combine", lora, w["dora"].parent / "lora", "--method", "linear", "-o", lora],
        "convert-source": ["convert", lora, "--to", "peft", "-o", lora],
    }[case]
    if case == "cwd":
        monkeypatch.chdir(root)
    if case == "symlink-to-base":
        (root / "link").symlink_to(base)
    before = listing(root)
    res = invoke(runner, *args, "--force")
    assert_one_line_error(res, "refusing to write the output here", "input")
    unchanged(w)
    assert listing(root) == before


def test_a_hub_cache_holding_the_input_is_refused(tmp_path):
    """OUT containing the blob store that a (Hub-cache-like) input's symlinks point into."""
    blobs, snap = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in ADAPTERS["llama-lora"].iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(blobs / f.name)
    with pytest.raises(AdaptkitError, match="contains the input"):
        merge(TINY_LLAMA, [snap], blobs, force=True)
    assert sorted(p.name for p in blobs.iterdir()) == sorted(p.name for p in ADAPTERS["llama-lora"].iterdir())


# ------------------------------------------------------------------------- config values the math uses

CONFIG_CASES = {
    "r-negative": ({"r": -8}, "r must be a positive integer"),
    "r-bool": ({"r": True}, "r must be a positive integer"),
    "r-huge-float": ({"r": 1e9}, "r must be a positive integer"),
    "r-zero": ({"r": 0}, "r must be a positive integer"),
    "r-fraction": ({"r": 2.5}, "r must be a positive integer"),
    "r-string": ({"r": "8"}, "r must be a positive integer"),
    "r-not-the-tensors": ({"r": 16}, "the config gives r=16"),
    "alpha-nan": ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    "alpha-inf": ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    "alpha-string": ({"lora_alpha": "16"}, "lora_alpha must be a finite number"),
    "rank-pattern-negative": ({"rank_pattern": {"q_proj": -1}}, "rank_pattern['q_proj']"),
    "rank-pattern-fraction": ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj']"),
    "rank-pattern-regex": ({"rank_pattern": {"q_proj(": 8}}, "not a valid regular expression"),
    "rank-pattern-list": ({"rank_pattern": ["q_proj", 8]}, "rank_pattern must be an object"),
    "alpha-pattern-regex": ({"alpha_pattern": {"[v": 4}}, "not a valid regular expression"),
    "alpha-pattern-nan": ({"alpha_pattern": {"v_proj": float("nan")}}, "alpha_pattern['v_proj']"),
    "rslora-string": ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    "dora-without-magnitudes": ({"use_dora": True}, "no lora_magnitude_vector"),
    "modules-to-save-string": ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
    "config-is-a-list": ([1, 2], "must be an object"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_values_that_would_change_the_merge_are_refused(runner, w, case):
    change, needle = CONFIG_CASES[case]
    cfg_path = w["lora"] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg = change if isinstance(change, list) else {**cfg, **change}
    cfg_path.write_text(json.dumps(cfg))  # NaN/Infinity written as JSON's non-standard literals, as Python does
    out = w["root"] / "out"
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", out)
    assert_one_line_error(res, needle)
    assert not out.exists() and not [p for p in w["root"].iterdir() if p.name.startswith(".out")]


def test_dora_magnitudes_with_use_dora_false_are_refused(runner, w):
    cfg_path = w["dora"] / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": False}))
    res = invoke(runner, "merge", w["base"], w["dora"], "-o", w["root"] / "out")
    assert_one_line_error(res, "use_dora is false", "DoRA magnitudes")


def test_inspect_still_shows_an_adapter_it_would_not_merge(runner, w):
    cfg_path = w["lora"] / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": True}))
    res = invoke(runner, "inspect", w["lora"], "--json")
    assert res.exit_code == 0, res.output
    assert any("no lora_magnitude_vector" in x for x in json.loads(res.stdout)["warnings"])


@pytest.mark.parametrize("args, needle", [
    (["--weight", "nan"], "--weight: must be finite"),
    (["--weight", "inf"], "--weight: must be finite"),
    (["--max-shard-size", "0"], "must be positive"),
    (["--max-shard-size", "0.0.1GB"], "cannot read size"),
    (["--max-shard-size", "-5MB"], "cannot read size"),
    (["--device", "gpu"], "unknown device 'gpu' (choose auto, cpu, cuda or cuda:N)"),
    (["--device", "cuda:x"], "unknown device"),
    (["--quantize", "nf4", "--blocksize", "0"], "--blocksize: must be one of"),
    (["--quantize", "nf4", "--blocksize", "100"], "--blocksize: must be one of"),
])
def test_bad_merge_options_are_one_line(runner, w, args, needle):
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "out", *args)
    assert_one_line_error(res, needle)
    unchanged(w)
    assert not (w["root"] / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_one_line(runner, w):
    assert_one_line_error(invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "o", "--device", "cuda"),
                          "sees no CUDA device")


@pytest.mark.parametrize("args, needle", [
    (["--method", "linear", "--weight", "nan", "--weight", "1"], "--weight: must be finite"),
    (["--method", "ties", "--density", "nan"], "--density: must be in"),
])
def test_bad_combine_inputs_are_one_line(runner, w, args, needle):
    res = invoke(runner, "combine", w["lora"], w["dora"].parent / "lora", *args, "-o", w["root"] / "out")
    assert_one_line_error(res, needle)
    unchanged(w)


def test_combine_refuses_adapters_of_different_models(runner, w):
    cfg_path = w["gpt2lora"] / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "fan_in_fan_out": False}))
    res = invoke(runner, "combine", w["lora"], w["gpt2lora"], "--method", "ties", "-o", w["root"] / "out")
    assert_one_line_error(res, "share no layer container", "model.layers", "transformer.h")


def test_combine_refuses_a_conv1d_and_a_linear_adapter(runner, w):
    res = invoke(runner, "combine", w["lora"], w["gpt2lora"], "--method", "linear", "-o", w["root"] / "out")
    assert_one_line_error(res, "different model layouts", "fan_in_fan_out")


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sign_election_of_one_adapter_is_refused(runner, w, method):
    res = invoke(runner, "combine", w["lora"], "--method", method, "-o", w["root"] / "out")
    assert_one_line_error(res, "no signs to elect")


# ---------------------------------------------------------------------------- hangs and unbounded reads

@pytest.mark.parametrize("where", ["adapter weights", "adapter config", "base shard", "base config", "shard index"])
@pytest.mark.parametrize("what", ["fifo", "dev-zero"])
def test_special_files_are_refused_without_hanging(runner, w, where, what):
    path = {"adapter weights": w["lora"] / "adapter_model.safetensors",
            "adapter config": w["lora"] / "adapter_config.json",
            "base shard": w["base"] / "model-00001-of-00002.safetensors",
            "base config": w["base"] / "config.json",
            "shard index": w["base"] / "model.safetensors.index.json"}[where]
    path.unlink()
    if what == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    t0 = time.monotonic()
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "out", seconds=20)
    assert_one_line_error(res, "expected a regular")
    assert time.monotonic() - t0 < 10
    assert not (w["root"] / "out").exists()


def test_an_oversized_config_is_refused(tmp_path):
    from adaptkit.io.files import read_json

    p = tmp_path / "c.json"
    p.write_text(json.dumps({"pad": "x" * 5000}))
    with pytest.raises(AdaptkitError, match="more than the 1000"):
        read_json(p, "adapter config", max_bytes=1000)


# ------------------------------------------------------------------------------------ corrupt bases

def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = edit(header)
    if not isinstance(text, str):
        text = json.dumps(text)
    body = text.encode() + b" " * (-len(text) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])


def _first_two(header):
    return [k for k in header if k != "__metadata__"][:2]


CORRUPTIONS = {
    "overlap": (lambda h: {**h, _first_two(h)[1]: {**h[_first_two(h)[1]], "data_offsets": [
        x - 2 for x in h[_first_two(h)[1]]["data_offsets"]]}}, "overlaps"),
    "negative-dim": (lambda h: {**h, _first_two(h)[0]: {**h[_first_two(h)[0]],
                                                        "shape": [-d for d in h[_first_two(h)[0]]["shape"]]}},
                     "shape must be a list of non-negative integers"),
    "duplicate-name": (lambda h: json.dumps(h)[:-1] + ", " + json.dumps({_first_two(h)[0]: h[_first_two(h)[0]]})[1:],
                       "duplicate key"),
    "metadata-not-strings": (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__"),
    "float-offsets": (lambda h: {**h, _first_two(h)[0]: {**h[_first_two(h)[0]], "data_offsets": [0.0, 1.5]}},
                      "data_offsets must be two non-negative integers"),
    "nan-literal": (lambda h: json.dumps(h)[:-1] + ', "x": NaN}', "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_base_shards_are_refused(runner, w, case):
    edit, needle = CORRUPTIONS[case]
    shard = w["base"] / "model-00001-of-00002.safetensors"
    _rewrite_header(shard, edit)
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "out")
    assert_one_line_error(res, needle, "model-00001-of-00002.safetensors")


def test_trailing_bytes_and_gaps_are_refused(runner, w):
    shard = w["base"] / "model-00002-of-00002.safetensors"
    with open(shard, "ab") as f:
        f.write(b"\0" * 16)
    assert_one_line_error(invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "o"),
                          "16 bytes after the last tensor")


@pytest.mark.parametrize("index", [{"weight_map": ["a"]}, {"weight_map": {"x": 3}}, [], {"weight_map": {"x": "../x"}}])
def test_malformed_shard_index_is_one_line(runner, w, index):
    (w["base"] / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "o"), "index")


# -------------------------------------------------------------------------------------- OS errors

def _mount_tmpfs(path, *options):
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")


@pytest.fixture
def small_fs(tmp_path):
    mounts = []

    def make(name, *options):
        path = tmp_path / name
        _mount_tmpfs(path, *options)
        mounts.append(path)
        return path

    yield make
    for m in mounts:
        if subprocess.run(["umount", str(m)]).returncode != 0:  # an fd left open in the fs: a leak to find
            subprocess.run(["umount", "-l", str(m)])
            pytest.fail(f"{m} still busy after the command: a file was left open")


def test_disk_full_is_one_line_and_leaves_nothing(runner, w, small_fs):
    fs = small_fs("fs", "size=96k")
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", fs / "out")
    assert_one_line_error(res, "ENOSPC")
    assert os.listdir(fs) == []
    unchanged(w)


def test_read_only_output_is_one_line(runner, w, small_fs):
    fs = small_fs("ro", "ro", "size=1m")
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", fs / "out")
    assert_one_line_error(res, "EROFS")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EIO, errno.EDQUOT])
def test_write_errors_are_one_line(runner, w, monkeypatch, code):
    """The same path without a real file system: the writer's OSError, whatever it is."""
    from adaptkit.io import safetensors_file

    def fail(self, *a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(safetensors_file._OutputFile, "_write_all", fail)
    monkeypatch.setattr(safetensors_file._OutputFile, "_copy_in", fail)
    out = w["root"] / "out"
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", out)
    assert_one_line_error(res, errno.errorcode[code])
    assert not out.exists() and not [p for p in w["root"].iterdir() if p.name.startswith(".out")]


def test_a_file_where_a_folder_should_be(runner, w):
    (w["root"] / "afile").write_text("x")
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "afile" / "out")
    assert_one_line_error(res, "is not a folder")
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "afile", "--force")
    assert_one_line_error(res, "exists and is not a folder")
    assert (w["root"] / "afile").read_text() == "x"


def test_a_symlinked_output_on_another_file_system(runner, w, tmp_path):
    """OUT a symlink into /dev/shm (another file system): written there, the link kept, nothing left over."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at /dev/shm")
    target = os.path.join(shm, f"adaptkit-test-{os.getpid()}")
    shutil.rmtree(target, ignore_errors=True)
    os.mkdir(target)
    link = w["root"] / "out"
    link.symlink_to(target)
    try:
        before_shm = set(os.listdir(shm))
        res = invoke(runner, "merge", w["base"], w["lora"], "-o", link, "--force")
        assert res.exit_code == 0, res.output
        assert link.is_symlink() and os.readlink(link) == target
        assert "model.safetensors.index.json" in os.listdir(target)
        assert set(os.listdir(shm)) == before_shm
        assert sorted(p.name for p in w["root"].iterdir() if p.name.startswith(".")) == []
    finally:
        shutil.rmtree(target, ignore_errors=True)


# ---------------------------------------------------------------------------------- leftovers

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_folders_of_dead_runs_are_cleaned(tmp_path):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.{dead}.abcd1234.adaptkit-tmp"
    live = tmp_path / f".out.{alive}.efgh5678.adaptkit-tmp"
    other = tmp_path / f".out.5.{dead}.ijkl9012.adaptkit-tmp"  # belongs to an output named "out.5"
    for p in (stale, live, other):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out)
    assert not stale.exists() and live.exists() and other.exists()


def test_an_output_moved_aside_by_a_dead_run_is_put_back(tmp_path):
    out, dead = tmp_path / "out", _dead_pid()
    old = tmp_path / f".out.{dead}.adaptkit-old"
    old.mkdir()
    (old / "keep.txt").write_text("previous output")
    with pytest.raises(AdaptkitError, match="already exists"):  # it is back, so a run without force refuses
        merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out)
    assert (out / "keep.txt").read_text() == "previous output" and not old.exists()


def test_written_files_have_ordinary_modes(runner, w):
    mask = os.umask(0o022)
    try:
        outs = {"combine": w["root"] / "c", "convert": w["root"] / "k.safetensors", "merge": w["root"] / "m"}
        assert invoke(runner, "combine", w["lora"], "--method", "linear", "--rank", "4", "-o", outs["combine"]
                      ).exit_code == 0
        assert invoke(runner, "convert", w["lora"], "--to", "kohya", "-o", outs["convert"]).exit_code == 0
        assert invoke(runner, "merge", w["base"], w["lora"], "-o", outs["merge"]).exit_code == 0
    finally:
        os.umask(mask)
    files = [outs["convert"], *outs["combine"].iterdir(), *outs["merge"].iterdir()]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o644"}
    assert {oct(outs[k].stat().st_mode & 0o777) for k in ("combine", "merge")} == {"0o755"}


# --------------------------------------------------------------------------------- paths and the Hub

def test_a_local_typo_is_never_sent_to_the_hub(runner, w, monkeypatch):
    monkeypatch.chdir(w["root"])
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    t0 = time.monotonic()
    res = invoke(runner, "merge", "base", "lora/nope", "-o", "out")
    assert_one_line_error(res, "no such file or folder in lora/")
    res = invoke(runner, "merge", "bse/x", "lora", "-o", "out")  # first part not local: a Hub id, asked once
    line = assert_one_line_error(res, "no such local file or folder", "cannot reach the Hub")
    assert "Retry" not in res.output and "bse/x" in line
    assert time.monotonic() - t0 < 15


def test_a_near_miss_gets_a_suggestion(runner, w, monkeypatch):
    monkeypatch.chdir(w["root"])
    os.mkdir("fx")
    shutil.move("base", "fx/tiny-llama")
    res = invoke(runner, "merge", "fx/tiny-lama", "lora", "-o", "out")
    assert_one_line_error(res, "did you mean fx/tiny-llama?")


# ------------------------------------------------------------------------------------------ verify

def test_verify_refuses_a_merged_model_of_another_architecture(runner, w):
    res = invoke(runner, "verify", w["base"], w["lora"], w["gpt2"], "--no-model")
    assert_one_line_error(res, "model_type 'gpt2' but the base is 'llama'")


def test_verify_reports_progress_over_every_tensor(tmp_path):
    from adaptkit import verify

    out = tmp_path / "m"
    merge(TINY_LLAMA, [ADAPTERS["llama-lora"]], out)
    started, steps = [], []

    class Count(adaptkit.Reporter):
        def start(self, label, total, unit="items"):
            started.append(total)

        def advance(self, n=1):
            steps.append(n)

    report = verify(TINY_LLAMA, [ADAPTERS["llama-lora"]], out, model=False, reporter=Count())
    assert report.ok and started == [len(load_dir(TINY_LLAMA))] and sum(steps) == started[0]


# ----------------------------------------------------------------------------------------- signals

@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A ~200 MB fp16 base and a LoRA on all of its tensors: a merge that lasts long enough to interrupt."""
    root = tmp_path_factory.mktemp("big")
    base, ad = root / "base", root / "lora"
    base.mkdir()
    ad.mkdir()
    gen = torch.Generator().manual_seed(0)
    n, dim = 24, 2048
    for s in range(2):
        save_file({f"model.layers.{i}.proj.weight": torch.randn(dim, dim, generator=gen).half()
                   for i in range(s * n // 2, (s + 1) * n // 2)}, base / f"model-0000{s + 1}-of-00002.safetensors")
    weight_map = {f"model.layers.{i}.proj.weight": f"model-0000{1 + i // (n // 2)}-of-00002.safetensors"
                  for i in range(n)}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text("{}")
    lora = {}
    for i in range(n):
        lora[f"base_model.model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(8, dim, generator=gen) / 50
        lora[f"base_model.model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(dim, 8, generator=gen) / 50
    save_file(lora, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    return base, ad


def _start_and_signal(base, ad, out, sig, force=False):
    cmd = [sys.executable, "-m", "adaptkit", "merge", str(base), str(ad), "-o", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd + (["--force"] if force else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    end = time.monotonic() + 120
    while time.monotonic() < end:
        tmps = list(out.parent.glob(f".{out.name}.*.adaptkit-tmp"))
        if tmps and any(f.stat().st_size > 4 << 20 for f in tmps[0].glob("*.safetensors")):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    assert proc.poll() is None, "the merge ended before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=10)
    return proc.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_mid_merge_leaves_nothing_and_keeps_the_old_output(big_pair, tmp_path, sig):
    import signal

    base, ad = big_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    before = snapshot(base, ad)
    code, stderr = _start_and_signal(base, ad, out, getattr(signal, sig), force=True)
    assert code == 128 + getattr(signal, sig), stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: interrupted ({sig})"), stderr
    assert listing(tmp_path) == ["out"] and listing(out) == ["old.txt"]
    assert snapshot(base, ad) == before


@pytest.mark.slow
def test_after_sigkill_the_next_run_cleans_up(big_pair, tmp_path):
    import signal

    base, ad = big_pair
    out = tmp_path / "out"
    code, _ = _start_and_signal(base, ad, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".adaptkit-tmp")]  # what SIGKILL cannot avoid
    merge(base, [ad], out, device="cpu")
    assert listing(tmp_path) == ["out"]
    merged = load_file(out / "model-00001-of-00002.safetensors")
    assert merged["model.layers.0.proj.weight"].shape == (2048, 2048)


@pytest.mark.parametrize("command", ["combine-linear", "combine-ties", "convert", "inspect-svd"])
def test_non_finite_factors_never_reach_the_svd(runner, w, command):
    p = w["lora"] / "adapter_model.safetensors"
    t = load_file(p)
    t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(t, p)
    out = w["root"] / "out"
    if command == "inspect-svd":
        res = invoke(runner, "inspect", w["lora"], "--svd", "--json")
        assert res.exit_code == 0, res.output
        assert any("NaN or Inf in model.layers.0.mlp.down_proj" in x for x in json.loads(res.stdout)["warnings"])
        return
    args = {"combine-linear": ["combine", w["lora"], w["dora"].parent / "lora", "--method", "linear", "--rank", "4"],
            "combine-ties": ["combine", w["lora"], w["dora"].parent / "lora", "--method", "ties"],
            "convert": ["convert", w["lora"], "--to", "kohya"]}[command]
    res = invoke(runner, *args, "-o", out if command != "convert" else w["root"] / "k.safetensors")
    assert_one_line_error(res, "NaN or Inf in", "mlp.down_proj.lora_B")


def test_a_base_config_that_is_not_an_object(runner, w):
    (w["base"] / "config.json").write_text("[1, 2]")
    assert_one_line_error(invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "o"),
                          "config.json", "must be an object")


def test_an_empty_output_path_and_control_characters_stay_one_line(runner, w, monkeypatch):
    monkeypatch.chdir(w["root"])
    assert_one_line_error(invoke(runner, "merge", w["base"], w["lora"], "-o", ""), "output path is empty")
    res = invoke(runner, "merge", w["base"], w["lora"], "-o", w["base"] / "x\ny")
    assert_one_line_error(res, "x\\ny", "input")


def test_an_adapter_with_no_modules_is_refused(runner, w):
    p = w["lora"] / "adapter_model.safetensors"
    save_file({"base_model.model.stray": torch.zeros(2)}, p)
    assert_one_line_error(invoke(runner, "merge", w["base"], w["lora"], "-o", w["root"] / "o"), "no LoRA modules")
