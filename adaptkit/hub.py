"""Adapters and models to and from the Hugging Face Hub, through huggingface_hub itself.

``pull`` downloads only what matters (adapter config + weights; for a model: configs, tokenizer,
safetensors and their index, never ``.bin`` when safetensors exist) with ``snapshot_download``,
into the Hugging Face cache or a folder. ``resolve`` lets every command take ``org/name[@revision]``
where it takes a path (a local path wins). ``push`` creates the repo if needed and uploads a folder
in one commit (large files go the Hub's normal large-file way), adding a model card when the folder
has none. The token is huggingface_hub's (``HF_TOKEN`` or the login); it is never printed or written.

``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read at each call (huggingface_hub reads
them at import), so they can be set after import, as tests do.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import AdaptkitError
from .io.files import os_error, read_bytes, read_json

HUB_TIMEOUT = 8.0  # seconds for the one question asked of the Hub before downloading
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"]
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "tokenizer*", "*.txt", "*.tiktoken", "*.jinja", "README.md"]


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def parse_id(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def looks_like_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not spec.startswith((".", "/"))


def _hub_error(e: Exception, repo_id: str, revision: str | None) -> AdaptkitError:
    """huggingface_hub's exceptions as one line with the remedy."""
    from huggingface_hub import errors as he

    name = type(e).__name__
    if isinstance(e, he.GatedRepoError):
        return AdaptkitError(f"{repo_id} is gated: accept its terms on the Hub, then log in (hf auth login or HF_TOKEN)")
    if isinstance(e, he.RevisionNotFoundError):
        return AdaptkitError(f"{repo_id} has no revision {revision!r}: check the branch, tag or commit")
    if isinstance(e, he.RepositoryNotFoundError):
        return AdaptkitError(f"{repo_id} not found on the Hub, or private: check the id, or log in "
                             "(hf auth login or HF_TOKEN)")
    if isinstance(e, (he.LocalEntryNotFoundError, he.OfflineModeIsEnabled)):
        return AdaptkitError(f"{repo_id} is not in the local cache and the Hub cannot be reached: connect, or pull "
                             "it first and set HF_HUB_OFFLINE=1")
    if isinstance(e, he.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status in (401, 403):
            return AdaptkitError(f"not allowed on {repo_id} (HTTP {status}): log in with a token that may write "
                                 "there (hf auth login or HF_TOKEN)")
        return AdaptkitError(f"the Hub answered HTTP {status} for {repo_id}: {str(e).splitlines()[0]}")
    detail = str(e).splitlines()[0][:120] if str(e).strip() else name
    return AdaptkitError(f"cannot reach the Hub for {repo_id} ({detail}): check the network or HF_ENDPOINT, or pull "
                         "it first and set HF_HUB_OFFLINE=1")


@dataclass
class PullResult:
    repo_id: str
    revision: str | None
    path: str
    files: list[str]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def pull(repo: str, *, out: str | Path | None = None, adapter_only: bool = False, repo_type: str = "model",
         progress: bool = False) -> PullResult:
    """Download an adapter or a model from the Hugging Face Hub; return where it is.

    Only what matters comes down: adapter config and weights; for a model also its configs,
    tokenizer, safetensors and index (never ``.bin`` when safetensors exist). The Hub is asked once,
    with a short timeout and no retries (a typo or a closed endpoint fails in seconds); when it
    cannot be reached, or with ``HF_HUB_OFFLINE=1``, the local cache answers.

    Args:
        repo: ``org/name`` or ``org/name@revision`` (a branch, tag or commit).
        out: download into this folder instead of the Hugging Face cache.
        adapter_only: only the adapter files (config, weights, card).
        repo_type: ``model``, ``dataset`` or ``space``.
        progress: let huggingface_hub draw its download bars (on stderr).

    Returns:
        A :class:`PullResult` with the local ``path`` and the ``files`` there.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as he

    transport = _transport_errors()

    repo_id, revision = parse_id(repo)
    patterns = ADAPTER_FILES if adapter_only else ADAPTER_FILES + MODEL_FILES
    ignore = []
    offline = _offline()
    unreachable = None  # why the Hub could not be asked, when the cache is tried instead
    try:
        if not offline:
            try:
                info = HfApi(endpoint=_endpoint()).repo_info(repo_id, revision=revision, repo_type=repo_type,
                                                             timeout=HUB_TIMEOUT)
            except (*transport, he.OfflineModeIsEnabled) as e:  # unreachable: the cache may hold it
                offline, unreachable = True, e
            else:
                files = [s.rfilename for s in (info.siblings or [])]
                if any(f.endswith(".safetensors") for f in files):
                    ignore = ["*.bin", "*.pt", "*.pth"]
                elif not adapter_only:
                    patterns = patterns + ["pytorch_model*.bin", "*.bin.index.json"]
        with _quiet_progress(not progress):
            path = snapshot_download(repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns,
                                     ignore_patterns=ignore or None, local_dir=str(out) if out else None,
                                     cache_dir=_cache_dir(), endpoint=_endpoint(), local_files_only=offline)
    except (he.HfHubHTTPError, he.LocalEntryNotFoundError, he.OfflineModeIsEnabled, *transport, ValueError) as e:
        # every Hub failure becomes one line; anything else is a bug and keeps its traceback
        if isinstance(e, he.LocalEntryNotFoundError) and unreachable is not None:
            e = unreachable
        raise _hub_error(e, repo_id, revision) from None
    except OSError as e:
        raise os_error(e, out, "cannot store the download") from None
    got = sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file() and ".cache" not in p.parts)
    return PullResult(repo_id, revision, str(path), got)


def _local_typo(spec: str) -> str | None:
    """Why ``spec`` is a local path that does not exist rather than a Hub id, or None.

    ``org/name`` is read as a Hub id unless its first part is a local folder: ``fixtures/tiny-lama``
    is then a typo of a path in ``fixtures/`` (with a suggestion), never a question to the Hub.
    """
    import difflib

    first, _, rest = spec.partition("/")
    if not os.path.isdir(first):
        return None
    try:
        names = os.listdir(first)
    except OSError:
        names = []
    close = difflib.get_close_matches(rest.partition("@")[0], names, n=1)
    hint = f" (did you mean {first}/{close[0]}?)" if close else ""
    return f"no such file or folder in {first}/{hint}"


def resolve(spec: str | Path, adapter_only: bool = False) -> Path:
    """A local path as given, or a Hub id pulled into the cache (a local path wins when both exist)."""
    p = Path(spec)
    if os.path.lexists(p) or not looks_like_hub_id(str(spec)):
        return p
    typo = _local_typo(str(spec))
    if typo:
        raise AdaptkitError(typo, spec)
    try:
        return Path(pull(str(spec), adapter_only=adapter_only).path)
    except AdaptkitError as e:
        raise AdaptkitError(f"{spec}: no such local file or folder, and as a Hub id: {e.message}") from None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's connection and timeout errors (httpx2, httpx or requests, by hub version)."""
    import importlib

    found = []
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    """huggingface_hub's progress bars off for one call, then back as they were."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


VERIFY_REPORT = "adaptkit_verify.json"


def verify_section(folder: Path) -> str | None:
    """A 'Verification' section from the report `adaptkit verify --write-report` left in the folder."""
    path = folder / VERIFY_REPORT
    if not path.exists():
        return None
    try:
        r = read_json(path, "verify report")
        s = r["summary"]
        float(s["worst_rel_error"]), float(s["median_rel_error"]), int(s["modules"])
    except (AdaptkitError, KeyError, TypeError, ValueError):
        return None
    lines = ["## Verification", "",
             f"`adaptkit verify` {'passed' if r.get('ok') else 'FAILED'}: {s['modules']} adapted modules checked "
             f"layer by layer, relative error worst {s['worst_rel_error']:.2e}, median {s['median_rel_error']:.2e}; "
             f"{r.get('untouched_checked', 0)} untouched tensors bit-identical to the base"
             + ("" if not r.get("untouched_mismatched") else f" except {len(r['untouched_mismatched'])}") + "."]
    m = r.get("model")
    if m:
        lines.append(f"Model level ({m['prompts']} prompts, {m['tokens']} tokens): max |Δlogits| "
                     f"{m['max_abs_logit_diff']:.3g}, mean KL {m['mean_kl']:.3g}, top-1 agreement "
                     f"{100 * m['top1_agreement']:.2f} %.")
    return "\n".join(lines) + "\n"


def model_card(folder: Path, repo_id: str) -> str:
    """A model card for a folder adaptkit (or peft) produced: YAML front matter and how it was made."""
    is_adapter = (folder / "adapter_config.json").exists()
    base = None
    if is_adapter:
        try:
            base = read_json(folder / "adapter_config.json", "adapter config").get("base_model_name_or_path")
        except AdaptkitError:
            pass
    meta = {}
    for name in ("adaptkit_combine.json",):
        if (folder / name).exists():
            try:
                meta = read_json(folder / name, "combine report")
            except AdaptkitError:
                meta = {}
    tags = ["lora", "adaptkit"] + ([meta["method"]] if meta.get("method") else [])
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += [f"library_name: {'peft' if is_adapter else 'transformers'}", "tags:"] + [f"- {t}" for t in tags]
    if base and is_adapter:
        lines.append(f"- base_model:adapter:{base}")
    lines += ["---", "", f"# {repo_id}", ""]
    if is_adapter:
        lines.append(f"A LoRA adapter{f' for `{base}`' if base else ''}, uploaded with adaptkit {__version__}.")
    else:
        lines.append(f"A model uploaded with adaptkit {__version__}.")
    if meta:
        lines += ["", f"Combined with `adaptkit combine --method {meta['method']}` from:", ""]
        lines += [f"- `{a}` (weight {w:g})" for a, w in zip(meta["adapters"], meta["weights"])]
        params = ", ".join(f"{k}={v}" for k, v in meta.get("parameters", {}).items() if v is not None)
        if params:
            lines += ["", f"Parameters: {params}."]
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files) + "."]
    section = verify_section(folder)
    return "\n".join(lines) + "\n" + ("\n" + section if section else "")


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit: str
    files: list[str]
    card_generated: bool
    pull_request: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def push(folder: str | Path, repo: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, create_pr: bool = False) -> PushResult:
    """Upload ``folder`` to the Hub repository ``repo`` (``org/name``) in one commit, creating it if needed.

    Large files take the Hub's large-file path. A folder without README.md gets a model card
    (base_model, library_name peft or transformers, tags, how it was made, and the numbers of
    ``adaptkit_verify.json`` when :func:`adaptkit.verify` left one). The token is huggingface_hub's
    (``HF_TOKEN`` or ``hf auth login``); it is never printed or written.

    Args:
        folder: the local folder to upload (it is not modified).
        repo: ``org/name``.
        private: create the repository private.
        revision: the branch to commit to (created if needed).
        message: the commit message.
        create_pr: open a pull request instead of committing to the branch.

    Returns:
        A :class:`PushResult` with the commit and the files uploaded.
    """
    repo_id = repo
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import errors as he

    folder = Path(folder)
    if not folder.is_dir():
        raise AdaptkitError("push takes a folder", folder)
    api = HfApi(endpoint=_endpoint())
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)
    if not files:
        raise AdaptkitError("nothing to push: the folder is empty", folder)
    card = not (folder / "README.md").exists()
    readme = model_card(folder, repo_id) if card else None
    section = verify_section(folder)
    if not card and section:  # adaptkit's own README, plus verify's numbers (the folder is not touched)
        text = read_bytes(folder / "README.md", 16 << 20, "README.md").decode("utf-8", errors="replace")
        readme = text if "## Verification" in text else text.rstrip("\n") + "\n\n" + section
    ops = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p)) for p in files
           if not (readme is not None and p.relative_to(folder) == Path("README.md"))]
    if readme is not None:
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, commit_message=message or f"Upload {folder.name} with adaptkit",
                                 revision=revision, create_pr=create_pr)
    except (he.HfHubHTTPError, he.OfflineModeIsEnabled, *_transport_errors(), ValueError) as e:
        raise _hub_error(e, repo_id, revision) from None  # anything else is a bug: keeps its traceback
    return PushResult(repo_id, str(url), info.oid, [op.path_in_repo for op in ops], card,
                      getattr(info, "pr_url", None))
