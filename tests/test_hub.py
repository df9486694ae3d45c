"""`adaptkit pull` / `push` and Hub ids as arguments, with the real huggingface_hub client against a
local Hub-compatible server (tests/hub_server.py) on 127.0.0.1."""

import json
import shutil

import pytest
from helpers import ADAPTERS, TINY_LLAMA, load_dir
from hub_server import HubServer
from huggingface_hub import ModelCard

from adaptkit.cli import main

TOKEN = "hf_adaptkitTestToken0123456789"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported (it reads it once): the
        # local server is the one Hub these tests may talk to
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield server


def invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args])


def test_push_pull_round_trip_with_model_card(runner, hub, tmp_path):
    src = ADAPTERS["llama-lora"]
    res = invoke(runner, "push", src, "me/llama-lora", "--json")
    assert res.exit_code == 0, res.output
    pushed = json.loads(res.stdout)
    assert pushed["card_generated"] and "README.md" in pushed["files"]
    assert any(r.startswith("POST /me/llama-lora.git/info/lfs/objects/batch") for r in hub.state.requests)  # LFS path
    res = invoke(runner, "pull", "me/llama-lora", "--json")
    assert res.exit_code == 0, res.output
    pulled = json.loads(res.stdout)
    path = pulled["path"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # byte-identical
        assert open(f"{path}/{name}", "rb").read() == (src / name).read_bytes(), name
    card = ModelCard.load(f"{path}/README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "fixtures/tiny-llama"
    assert "lora" in card.data.tags and "adaptkit" in card.data.tags
    # offline, from the cache
    hub.state.requests.clear()
    res = runner.invoke(main, ["pull", "me/llama-lora", "--json"], env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["path"] == path and not hub.state.requests


def test_hub_id_merges_like_the_local_path(runner, hub, tmp_path):
    assert invoke(runner, "push", ADAPTERS["llama-rslora-patterns"], "me/rs").exit_code == 0
    assert invoke(runner, "push", TINY_LLAMA, "me/tiny-llama").exit_code == 0
    res = invoke(runner, "merge", "me/tiny-llama", "me/rs", "-o", tmp_path / "from-hub")
    assert res.exit_code == 0, res.output
    assert invoke(runner, "merge", TINY_LLAMA, ADAPTERS["llama-rslora-patterns"], "-o", tmp_path / "local").exit_code == 0
    a, b = load_dir(tmp_path / "from-hub"), load_dir(tmp_path / "local")
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
    res = invoke(runner, "inspect", "me/rs", "--json")
    assert res.exit_code == 0 and len(json.loads(res.stdout)["modules"]) == 14
    res = invoke(runner, "verify", "me/tiny-llama", "me/rs", tmp_path / "from-hub", "--no-model")
    assert res.exit_code == 0, res.output


def test_pull_filters_files(runner, hub, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY_LLAMA, model)
    (model / "pytorch_model.bin").write_bytes(b"legacy weights")
    (model / "notes.xyz").write_text("not needed")
    assert invoke(runner, "push", model, "me/model").exit_code == 0
    res = invoke(runner, "pull", "me/model", "-o", tmp_path / "dl", "--json")
    assert res.exit_code == 0, res.output
    files = set(json.loads(res.stdout)["files"])
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert "pytorch_model.bin" not in files and "notes.xyz" not in files  # no .bin when safetensors exist
    assert (tmp_path / "dl" / "model-00001-of-00002.safetensors").exists()


def test_revision_branch_and_pr(runner, hub):
    assert invoke(runner, "push", ADAPTERS["llama-lora"], "me/a").exit_code == 0
    res = invoke(runner, "push", ADAPTERS["llama-dora"], "me/a", "--revision", "dora", "--json")
    assert res.exit_code == 0, res.output
    res = invoke(runner, "pull", "me/a@dora", "--json")
    assert res.exit_code == 0 and "adapter_model.safetensors" in json.loads(res.stdout)["files"]
    res = invoke(runner, "inspect", "me/a@dora", "--json")
    assert json.loads(res.stdout)["use_dora"] is True
    res = invoke(runner, "push", ADAPTERS["llama-rslora-patterns"], "me/a", "--create-pr", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["pull_request"].endswith("/discussions/1")


@pytest.mark.parametrize("args,expect", [
    (["pull", "me/nothing-here"], "not found on the Hub"),
    (["pull", "me/a@no-such-branch"], "no revision"),
    (["inspect", "me/nothing-here"], "no such local file or folder"),
])
def test_errors_are_one_line_with_remedy(runner, hub, args, expect):
    assert invoke(runner, "push", ADAPTERS["llama-lora"], "me/a").exit_code == 0
    res = invoke(runner, *args)
    assert res.exit_code == 2, res.output
    assert expect in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_private_repo_needs_the_token(runner, hub, monkeypatch):
    assert invoke(runner, "push", ADAPTERS["llama-lora"], "me/secret", "--private").exit_code == 0
    monkeypatch.setenv("HF_TOKEN", "hf_wrongwrongwrongwrong")
    res = invoke(runner, "pull", "me/secret")
    assert res.exit_code == 2 and "log in" in res.stderr


def test_offline_without_cache_says_how(runner, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = invoke(runner, "pull", "me/never-pulled")
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.stderr


def test_token_never_appears(runner, hub, tmp_path):
    outputs = []
    for args in (["push", ADAPTERS["llama-lora"], "me/t", "--json"], ["pull", "me/t", "--json"],
                 ["pull", "me/t", "-o", tmp_path / "dl"], ["push", ADAPTERS["llama-lora"], "me/t"],
                 ["merge", TINY_LLAMA, "me/t", "-o", tmp_path / "m", "--json"]):
        res = invoke(runner, *args)
        assert res.exit_code == 0, res.output
        outputs.append(res.output)
    assert any(TOKEN in a for a in hub.state.auth_seen)  # the client did send it
    assert not any(TOKEN in o for o in outputs)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


def test_gated_repo_says_accept_terms(runner, hub):
    assert invoke(runner, "push", ADAPTERS["llama-lora"], "me/gated").exit_code == 0
    hub.state.repos["me/gated"].gated = True
    res = invoke(runner, "pull", "me/gated")
    assert res.exit_code == 2 and "gated" in res.stderr and "accept" in res.stderr


def test_unreachable_hub_says_what_to_do(runner, monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    res = invoke(runner, "pull", "me/anything")
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_merged_model_card_carries_verify_numbers(runner, hub, tmp_path):
    out = tmp_path / "merged"
    assert invoke(runner, "merge", TINY_LLAMA, ADAPTERS["llama-lora"], "-o", out).exit_code == 0
    res = invoke(runner, "verify", TINY_LLAMA, ADAPTERS["llama-lora"], out, "--write-report")
    assert res.exit_code == 0, res.output
    readme_before = (out / "README.md").read_text()
    assert invoke(runner, "push", out, "me/merged").exit_code == 0
    assert (out / "README.md").read_text() == readme_before  # the folder is not modified
    path = json.loads(invoke(runner, "pull", "me/merged", "--json").stdout)["path"]
    card = ModelCard.load(f"{path}/README.md")
    assert card.data.library_name == "transformers" and "merge" in card.data.tags
    assert "## Verification" in card.text and "passed" in card.text and "Model level" in card.text
