"""The ``adaptkit`` command line: a thin shell over the library.

Every command parses its flags, calls one library function and renders the result (a rich table,
or one JSON object with ``--json``). User mistakes arrive as :class:`AdaptkitError` and leave as one
line on stderr with exit status 2.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import AdaptkitError

# Piped output keeps whole module names (rich would otherwise cut tables at 80 columns). Markup is
# off: paths and tensor names may hold square brackets; colour comes from Text objects only.
stdout = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, markup=False, width=None if sys.stderr.isatty() else 200)


def styled(label: str, style: str, rest: str = "") -> Text:
    """``label`` in ``style``, then ``rest`` as plain text."""
    return Text(label, style=style) + Text(rest)


class Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's main, with usage errors (a bad option value, a missing argument) as one line too."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:  # `adaptkit` alone: the help
                click.echo(e.ctx.get_help())
                sys.exit(0)
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        """Runs a command so that every way it can fail ends in one line and a documented exit status:
        a user mistake or an OS error (disk full, read-only…) exits 2; Ctrl-C, SIGTERM and SIGHUP stop the
        command like an exception (outputs in progress are removed) and exit 128 + the signal number."""
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                previous[sig] = signal.signal(sig, _stop)
            except (ValueError, OSError):  # not the main thread: leave signals alone
                pass
        try:
            return super().invoke(ctx)
        except AdaptkitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except BrokenPipeError:  # `adaptkit … | head`: the reader is gone, nothing more to say
            sys.stderr.close()
            sys.exit(1)
        except OSError as e:  # what the library did not name itself
            from .io.files import os_error

            click.echo(f"error: {os_error(e)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
            click.echo(f"error: interrupted ({signal.Signals(signum).name}); nothing was written", err=True)
            sys.exit(128 + signum)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _stop(signum, frame):
    """SIGTERM and SIGHUP as Ctrl-C: unwinds the command, so temporary outputs are removed."""
    raise KeyboardInterrupt(signum)


def local(spec, adapter_only: bool = False):
    """A path argument, or an ``org/name[@revision]`` Hub id pulled into the cache (a local path wins)."""
    if spec is None:
        return None
    from .hub import resolve

    return str(resolve(spec, adapter_only=adapter_only))


def _read_ahead(folder):
    """Start reading a local model folder's weights into the page cache (adaptkit/readahead.py); None otherwise."""
    from .io.layout import find_weight_files
    from .io.readahead import Readahead

    if not Path(folder).is_dir():
        return None
    try:
        return Readahead.of_files(find_weight_files(folder).files).start()
    except AdaptkitError:
        return None  # the merge itself reports what is wrong with the folder


def _quant_settings(ctx, config, quant_type, blocksize, double_quant, dtype):
    """QuantSettings from --quant-config, with the flags given on the command line (or, without a
    config, their defaults) taking precedence; --dtype, when a float type, is the compute dtype."""
    import dataclasses

    import torch
    from click.core import ParameterSource

    from .plan import resolve_dtype
    from .quant import QuantSettings

    def given(name):
        return not config or ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    settings = QuantSettings.from_config(config) if config else QuantSettings()
    changes = {name: value for name, value in (("quant_type", quant_type), ("blocksize", blocksize),
                                               ("double_quant", double_quant)) if given(name)}
    compute = resolve_dtype(dtype)  # None for auto
    if compute is not None or not config:
        changes["compute_dtype"] = compute or torch.float16
    return dataclasses.replace(settings, **changes)


def warn(message: str) -> None:
    err.print(styled("warning:", "yellow", f" {message}"), soft_wrap=True)


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="adaptkit")
@click.option("-v", "--verbose", is_flag=True, help="Show the log lines of huggingface_hub, transformers and "
                                                    "bitsandbytes (quiet by default).")
def main(verbose):
    """Inspect, merge, combine, convert and verify LoRA adapters.

    Exact (fp32 math, rounded once), streaming (peak memory follows the largest tensor, not the
    model) and GPU-aware. Wherever a path is taken, a Hub id org/name[@revision] works too. Try it
    on the shipped fixtures:

    \b
      adaptkit inspect fixtures/adapters/llama-lora --svd
      adaptkit merge fixtures/tiny-llama fixtures/adapters/llama-lora -o out/merged
      adaptkit verify fixtures/tiny-llama fixtures/adapters/llama-lora out/merged
      adaptkit combine fixtures/adapters/llama-lora fixtures/adapters/llama-rslora-patterns \\
          --method ties --energy 0.95 -o out/combined
      adaptkit convert fixtures/adapters/llama-lora --to kohya -o out/llama-lora.safetensors
    """
    # bitsandbytes (imported by peft) logs a warning about an optional CPU kernel package on import;
    # huggingface_hub logs each retry and fallback. The command says what matters in one line.
    level = logging.INFO if verbose else logging.ERROR
    for name in ("bitsandbytes", "huggingface_hub", "transformers", "peft"):
        logging.getLogger(name).setLevel(level)


@main.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--svd", is_flag=True, help="Add each module's singular values of ΔW and the ranks holding 90/99 % of its energy.")
@click.option("--check", "checks", multiple=True, type=click.Choice(["vllm", "llamacpp", "mlx"]),
              help="Say whether the adapter loads in vLLM, llama.cpp or mlx-lm, and how to fix it if not "
                   "(repeatable). Exit status 1 when a check fails.")
@click.option("--max-lora-rank", type=int, default=16, show_default=True, help="vLLM's --max-lora-rank, for --check vllm.")
def inspect(source, as_json, svd, checks, max_lora_rank):
    """Show what a LoRA adapter holds.

    SOURCE is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin), an
    mlx-lm folder, a single .safetensors file of LoRA tensors (PEFT or kohya names), or a Hub id
    org/name[@revision]. Prints a summary, one row per adapted module (named as
    in the base model) and health warnings: untrained B, NaN/Inf, shapes that do not fit, ranks
    that differ from the config, tensors that belong to no module.
    """
    from .adapter import load_adapter
    from .inspection import inspect_adapter

    adapter = load_adapter(local(source, adapter_only=True))
    report = inspect_adapter(adapter, svd=svd)
    results = []
    if checks:
        from .readiness import check

        results = [check(adapter, t, max_lora_rank) for t in checks]
    if as_json:
        d = report.to_dict()
        if results:
            d["checks"] = {r.target: r.to_dict() for r in results}
        print_json(d)
    else:
        _render_inspect(report, svd)
        for r in results:
            stdout.print()
            if r.ok:
                stdout.print(styled("ok", "green", f" {r.target}: the adapter should load"))
            for p in r.problems:
                stdout.print(styled("✗", "red", f" {r.target}: {p.rule}: {p.detail}\n    fix: {p.fix}"))
    if results and not all(r.ok for r in results):
        sys.exit(1)


def _render_inspect(report, svd: bool) -> None:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    scaling = f"{report.scaling:g}" if report.scaling is not None else "per module (see table)"
    rows = [
        ("adapter", report.path), ("format", report.format), ("peft type", report.peft_type),
        ("base model", report.base_model or "-"), ("r", str(report.r)), ("alpha", f"{report.lora_alpha}"),
        ("scaling", scaling), ("rsLoRA", "yes" if report.use_rslora else "no"),
        ("DoRA", "yes" if report.use_dora else "no"),
        ("target modules", ", ".join(report.target_modules) if isinstance(report.target_modules, list)
         else str(report.target_modules or "-")),
        ("modules to save", ", ".join(report.modules_to_save) or "-"),
        ("dtype", ", ".join(report.dtype)), ("parameters", f"{report.parameters:,}"),
        ("file size", _human_bytes(report.file_size)), ("modules", str(len(report.modules))),
    ]
    for k, v in rows:
        summary.add_row(k, v)
    stdout.print(summary)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "kind", "rank", "alpha", "scaling", "in", "out"):
        table.add_column(col, justify="left" if col in ("module", "kind") else "right", no_wrap=True)
    if svd:
        table.add_column("rank@90%", justify="right")
        table.add_column("rank@99%", justify="right")
        table.add_column("top σ", justify="right")
    for m in report.modules:
        kind = m.kind + (" +DoRA" if m.dora else "") + (" +bias" if m.lora_bias else "")
        row = [m.name, kind, str(m.rank), f"{m.alpha:g}", f"{m.scaling:.4g}", str(m.in_features), str(m.out_features)]
        if svd:
            row += [str(m.rank_90), str(m.rank_99), f"{m.singular_values[0]:.4g}" if m.singular_values else "-"]
        table.add_row(*row)
    stdout.print()
    stdout.print(table)
    for w in report.warnings:
        warn(w)


@main.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...]")
@click.option("-o", "--output", "out", required=True,
              help="Folder to write the merged model to (created; refused if it exists, unless --force).")
@click.option("--weight", "weights", type=float, multiple=True,
              help="Scale of each adapter's ΔW, once per adapter, in order (default 1).")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present), cpu, cuda or cuda:N. Results match across devices within rounding.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
              help="Output dtype of floating tensors; auto keeps each tensor's own.")
@click.option("--max-shard-size", default=None,
              help="Re-shard the output (e.g. 5GB, 500MB); by default the base's shard layout is kept.")
@click.option("--quantize", type=click.Choice(["nf4"]), default=None,
              help="Write a bitsandbytes 4-bit model. A 4-bit base stays 4-bit (merged layers requantized with its "
                   "settings, the rest copied byte for byte); a dense base is quantized as transformers would. "
                   "Without it a 4-bit base is merged dense, in its compute dtype.")
@click.option("--qlora", is_flag=True,
              help="Dense base: merge as QLoRA trained, onto each weight's 4-bit round trip (see docs/nf4.md).")
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True,
              help="For --qlora or --quantize on a dense base.")
@click.option("--blocksize", type=int, default=64, show_default=True, help="For --qlora or --quantize on a dense base.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="For --qlora or --quantize on a dense base.")
@click.option("--quant-config", type=click.Path(exists=True), default=None,
              help="For --qlora or --quantize on a dense base: the settings from a JSON file, as "
                   "BitsAndBytesConfig.to_json_file writes it, or a 4-bit model's config.json (or its folder). "
                   "The flags above, when given, override it.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
def merge(base, adapters, out, weights, device, dtype, max_shard_size, quantize, qlora, quant_type, blocksize,
          double_quant, quant_config, force, as_json):
    """Fold LoRA adapters into a base model: W' = W + weight · (α/r) · B·A.

    BASE is a model folder in the Hugging Face layout (config.json with model.safetensors, sharded
    safetensors + index, or pytorch_model*.bin), or a Hub id. Each ADAPTER is a PEFT folder, a
    .safetensors file (raw PEFT names or kohya), an mlx-lm folder, or a Hub id; several are folded
    in order. ΔW is computed in fp32 and rounded once into
    the output dtype; DoRA, rsLoRA, rank/alpha patterns, Conv1D (GPT-2), embedding LoRA,
    modules_to_save and lora_bias follow peft's formulas.

    Streaming: one tensor at a time is read, merged and written; untouched tensors are copied
    file-to-file. Output goes to a temporary folder beside OUT, renamed into place at the end.

    A bitsandbytes 4-bit (NF4/FP4) base is dequantized with bitsandbytes and merged into a dense
    model in its compute dtype; --quantize nf4 keeps it 4-bit. The relative error each merged layer
    carries against the exact merge is reported.

    \b
    Example:
      adaptkit merge fixtures/tiny-llama fixtures/adapters/llama-lora -o out/merged
    """
    ahead = _read_ahead(base)  # before torch is imported: the disk works during the imports
    from .merge import merge as merge_fn

    settings = None
    if qlora or quantize:
        settings = _quant_settings(click.get_current_context(), quant_config, quant_type, blocksize, double_quant,
                                   dtype)
    elif quant_config:
        raise AdaptkitError("--quant-config is for --qlora or --quantize", quant_config)
    command = "adaptkit merge " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["merge"] else None
    try:
        with Bar("merging", in_bytes=True, disable=as_json) as bar:
            base, adapters = local(base), [local(a, adapter_only=True) for a in adapters]
            result = merge_fn(base, list(adapters), out, weights=list(weights) or None, device=device, dtype=dtype,
                              max_shard_size=max_shard_size, force=force, warn=warn,
                              on_plan=lambda plan: bar.start(sum(j.out_bytes for j in plan.jobs)),
                              progress=bar.advance, command=command, quantize=quantize, qlora=qlora,
                              settings=settings)
    finally:
        if ahead is not None:
            ahead.close()
    if as_json:
        print_json(result.to_dict())
        return
    stdout.print(f"merged {result.modules_merged} modules into {result.tensors_merged} of {result.tensors} tensors "
              f"→ {result.out} ({_human_bytes(result.bytes_written)} in {result.seconds:.1f} s on {result.device}, "
              f"peak memory {_human_bytes(result.peak_rss_bytes)})")
    q = result.quantization
    if q:
        stdout.print(f"quantization: {q['layers']} merged layers {q['what']}; relative error per layer: "
                     f"median {q['median']:.2e}, worst {q['worst']:.2e}")


@main.command()
@click.argument("source")
@click.option("--to", "to", required=True, type=click.Choice(["peft", "raw", "kohya", "gguf", "mlx"]),
              help="peft: a folder peft loads; raw: one .safetensors with peft names and the config in its "
                   "metadata; kohya: lora_down/lora_up/alpha names; gguf: a llama.cpp adapter (needs --base); "
                   "mlx: an mlx-lm adapter folder.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16"]), default="f32", show_default=True,
              help="Tensor type of a GGUF adapter.")
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="A folder for --to peft, a .safetensors file otherwise.")
@click.option("--base", default=None, help="The base model folder: maps kohya names (underscores) back to module names.")
@click.option("--dtype", default=None, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Cast the LoRA factors (default: keep their dtype).")
@click.option("--prefix", default="lora_te_", show_default=True, help="Name prefix of a kohya file written.")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def convert(source, to, out, outtype, base, dtype, prefix, force, as_json):
    """Move an adapter between layouts without changing its ΔW.

    SOURCE is detected: a PEFT folder (safetensors or legacy .bin), an mlx-lm folder, a raw
    .safetensors of PEFT names (…q_proj.lora_A.weight), or a kohya file (lora_te_…/lora_unet_…
    prefixes, .lora_down/.lora_up, .alpha). GGUF (llama.cpp) and MLX outputs hold one alpha or
    scale, so each module's own scaling is folded into its lora_b: per-module ranks, alphas and
    rsLoRA stay exact. Each module keeps its exact scaling: kohya files get a per-module alpha (rsLoRA and
    rank/alpha patterns included); PEFT folders get rank_pattern/alpha_pattern where modules differ.
    Without a config or alphas, alpha = r is assumed, with a warning.

    \b
    Examples:
      adaptkit convert fixtures/adapters/llama-lora --to kohya -o out/llama-lora.safetensors
      adaptkit convert out/llama-lora.safetensors --to peft -o out/llama-lora-peft
      adaptkit convert some-kohya.safetensors --to peft --base path/to/base -o out/adapter
    """
    from .convert import convert as convert_fn

    result = convert_fn(local(source, adapter_only=True), to, out, base=local(base), dtype=dtype, force=force,
                        prefix=prefix, warn=warn, outtype=outtype)
    if as_json:
        print_json(result.to_dict())
    else:
        stdout.print(f"converted {result.modules} modules ({result.source_format} → {result.to}) → {result.out}")


@main.command()
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...]")
@click.option("--method", required=True,
              type=click.Choice(["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
              help="How the per-module deltas ΔWᵢ = sᵢ·Bᵢ·Aᵢ are combined (see below).")
@click.option("--weights", default=None, help="Comma-separated weight per adapter, e.g. 1,0.5 (default all 1).")
@click.option("--density", type=float, default=None, help="Fraction of entries kept (ties, dare_*, magnitude_prune; default 0.5).")
@click.option("--majority-sign", default="total", show_default=True, type=click.Choice(["total", "frequency"]),
              help="TIES sign election: sign of the weighted sum, or the most frequent sign.")
@click.option("--rank", type=int, default=None, help="Rank of the output (best rank-R approximation, per module).")
@click.option("--energy", type=float, default=None,
              help="Per module, the smallest rank keeping this fraction of ‖ΔW‖² (e.g. 0.99).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the DARE masks (per module).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("-o", "--output", "out", required=True, help="Output folder.")
@click.option("--base", default=None, help="Merge the combination into this base model instead of writing an adapter.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def combine(adapters, method, weights, density, majority_sign, rank, energy, seed, device, out, base, force, as_json):
    """Fuse several LoRA adapters into one, on exact deltas.

    Every method works on each module's full ΔWᵢ = sᵢ·Bᵢ·Aᵢ (peft's add_weighted_adapter works on
    A and B separately for linear/TIES/DARE, which adds cross terms Bᵢ·Aⱼ), then factors the result
    back into a LoRA with a truncated SVD (the best rank-R approximation), reporting the energy kept.

    \b
    linear           Σ wᵢ·ΔWᵢ; exact as a LoRA of rank Σrᵢ unless --rank/--energy
    magnitude_prune  keep the top --density of each ΔWᵢ by |x|, then Σ wᵢ·ΔWᵢ
    ties             prune, elect a sign per entry, average agreeing entries (Yadav et al. 2023)
    dare_linear      drop with prob. 1−density, rescale 1/density, Σ wᵢ·ΔWᵢ (Yu et al. 2023)
    dare_ties        DARE, then TIES sign election and disjoint mean

    One adapter with --method linear --rank R gives its best rank-R approximation (e.g. to fit
    vLLM's max_lora_rank). Without --rank/--energy, pruned methods keep the largest input rank. DARE masks are seeded per
    (--seed, module name): the same seed gives identical files on any device.

    \b
    Example:
      adaptkit combine fixtures/adapters/llama-lora fixtures/adapters/llama-rslora-patterns \\
          --method ties --density 0.5 --rank 8 -o out/combined
    """
    from .combine import combine as combine_fn

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise AdaptkitError(f"--weights must be comma-separated numbers, got {weights!r}") from None
    command = "adaptkit combine " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["combine"] else None
    adapters = [local(a, adapter_only=True) for a in adapters]
    with Bar("combining", in_bytes=False, disable=as_json) as bar:
        result = combine_fn(list(adapters), method, out, weights=w, density=density, majority_sign=majority_sign,
                            rank=rank, energy=energy, seed=seed, device=device, base=local(base), force=force,
                            warn=warn, command=command, on_start=bar.start, progress=bar.advance)
    if as_json:
        print_json(result.to_dict())
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "rank", "energy kept"):
        table.add_column(col, justify="left" if col == "module" else "right", no_wrap=True)
    for m in result.modules:
        table.add_row(m.name, str(m.rank), f"{100 * m.retained_energy:.2f} %")
    stdout.print(table)
    what = f"merged into {result.merged_into}" if result.merged_into else "adapter"
    stdout.print(f"{result.method} of {len(result.adapters)} adapters → {result.out} ({what}, "
                 f"{result.seconds:.1f} s on {result.device})")


@main.command()
@click.argument("base")
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...] MERGED")
@click.option("--weight", "weights", type=float, multiple=True, help="The --weight each adapter was merged with.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False),
              help="A text file, one prompt per line, for the model-level check (default: random token ids).")
@click.option("--device", default="auto", show_default=True,
              help="Where the model-level check runs: auto, cpu or cuda (the layer probes run on the CPU).")
@click.option("--tolerance", type=float, default=None,
              help="Largest relative error a module may show (default: 3x the rounding noise of the output dtype).")
@click.option("--no-model", is_flag=True, help="Skip the model-level check (it loads the model twice).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probes and random prompts.")
@click.option("--write-report", is_flag=True,
              help="Save the report as adaptkit_verify.json in MERGED (a local folder); `adaptkit push` then puts "
                   "its numbers in the model card.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def verify(base, paths, weights, prompts, device, tolerance, no_model, seed, write_report, as_json):
    """Prove that MERGED equals BASE + ADAPTERs. Exit 0 when it does, 1 when it does not.

    \b
    Layer level (any architecture, streamed): for each adapted module, seeded random probes x go
    through the merged weight and are compared with W·x + scaling·B(A·x) (the DoRA formula for
    DoRA), computed from the factors. The error is reported next to the rounding noise the output
    dtype alone must cause; tensors no adapter touches must be bit-identical to the base.
    Model level (when transformers knows the architecture): logits of base + adapters unmerged
    (peft) against MERGED: max |Δlogits|, mean KL, top-1 agreement.

    \b
    Example:
      adaptkit merge fixtures/tiny-llama fixtures/adapters/llama-lora -o out/merged
      adaptkit verify fixtures/tiny-llama fixtures/adapters/llama-lora out/merged
    """
    from .verify import verify as verify_fn

    if len(paths) < 2:
        raise AdaptkitError("give the adapter(s) and then the merged model folder")
    adapters, merged = [local(a, adapter_only=True) for a in paths[:-1]], local(paths[-1])
    base = local(base)
    lines = None
    if prompts:
        from .io.files import read_bytes

        text = read_bytes(prompts, 16 << 20, "prompts file").decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    if write_report and not Path(paths[-1]).is_dir():
        raise AdaptkitError("--write-report needs MERGED to be a local folder", paths[-1])
    with Bar("checking layers", in_bytes=False, disable=as_json) as bar:
        report = verify_fn(base, adapters, merged, weights=list(weights) or None, prompts=lines, device=device,
                           tolerance=tolerance, model=not no_model, seed=seed, on_start=bar.start,
                           progress=bar.advance, on_stage=bar.stage)
    if write_report:
        from .hub import VERIFY_REPORT
        from .io.output import atomic_output_file

        with atomic_output_file(Path(paths[-1]) / VERIFY_REPORT, force=True, inputs=[base, *adapters]) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if as_json:
        print_json(report.to_dict())
    else:
        _render_verify(report)
    sys.exit(0 if report.ok else 1)


def _render_verify(report) -> None:
    table = Table(show_edge=False, pad_edge=False, title="layer level")
    for col in ("tensor", "kind", "rel. error", "rounding noise", "allowed", ""):
        table.add_column(col, justify="left" if col in ("tensor", "kind", "") else "right", no_wrap=True)
    for m in report.modules:
        status = styled("ok", "green") if m.ok else styled("FAIL", "red")
        table.add_row(m.name, m.kind, f"{m.rel_error:.2e}", f"{m.rounding_noise:.2e}", f"{m.allowed:.2e}",
                      status + Text(f" {m.note}" if m.note else ""))
    stdout.print(table)
    n = report.untouched_checked
    if report.untouched_mismatched:
        stdout.print(styled("FAIL", "red", f" {len(report.untouched_mismatched)} of {n} untouched tensors differ "
                                          f"from the base: {', '.join(report.untouched_mismatched[:5])}"))
    else:
        stdout.print(styled("ok", "green", f" {n} untouched tensors are bit-identical to the base"))
    if report.model is not None:
        m = report.model
        stdout.print((styled("ok", "green") if m.ok else styled("FAIL", "red")) + Text(
            f" model level ({m.prompts} prompts, {m.tokens} tokens, {m.source}): max |Δlogits| "
            f"{m.max_abs_logit_diff:.3g}, mean KL {m.mean_kl:.3g}, top-1 agreement {100 * m.top1_agreement:.2f} %"))
    for w in report.warnings:
        warn(w)
    failed = [m.name for m in report.modules if not m.ok] + report.untouched_mismatched
    if report.ok:
        stdout.print(styled("verified", "bold green", ": the merged model computes base + adapters"))
    else:
        stdout.print(styled("not verified", "bold red", f": {len(failed)} tensors fail"
                            + (f" (first: {failed[0]})" if failed else "")
                            + ("" if report.model is None or report.model.ok else "; logits differ")))


@main.command()
@click.argument("repo")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default=None,
              help="Download into this folder instead of the Hugging Face cache.")
@click.option("--adapter-only", is_flag=True, help="Only the adapter files (config, weights, card).")
@click.option("--repo-type", default="model", show_default=True, type=click.Choice(["model", "dataset", "space"]))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def pull(repo, out, adapter_only, repo_type, as_json):
    """Download an adapter or a model from the Hub: REPO is org/name[@revision].

    Only what matters comes down (adapter config and weights; for a model also config, tokenizer,
    safetensors and index; never .bin when safetensors exist). Prints the local path. With
    HF_HUB_OFFLINE=1 it answers from the cache. Every command also takes a Hub id where it takes a
    path, through this same code.
    """
    from .hub import pull as pull_fn

    result = pull_fn(repo, out=out, adapter_only=adapter_only, repo_type=repo_type, progress=not as_json)
    if as_json:
        print_json(result.to_dict())
    else:
        click.echo(result.path)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to commit to (created if needed).")
@click.option("--message", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def push(folder, repo, private, revision, message, create_pr, as_json):
    """Upload FOLDER to the Hub repo REPO (org/name) in one commit, creating the repo if needed.

    Large files take the Hub's normal large-file path. If FOLDER has no README.md, a model card is
    added: base_model, library_name (peft for adapters, transformers for models), tags, and how the
    folder was produced. The token comes from HF_TOKEN or `hf auth login`; it is never printed.
    """
    from .hub import push as push_fn

    result = push_fn(folder, repo, private=private, revision=revision, message=message, create_pr=create_pr)
    if as_json:
        print_json(result.to_dict())
    else:
        where = result.pull_request or result.url
        card = " (model card generated)" if result.card_generated else ""
        stdout.print(f"pushed {len(result.files)} files to {result.repo_id} @ {result.commit[:10]}{card}: {where}")


class Bar:
    """A rich progress bar on stderr that starts once its total is known, so that an error raised
    before (a plan that does not hold, say) prints alone: rich prints a newline when a bar that
    never started is stopped. Over bytes (with speed) or over a count of items."""

    def __init__(self, label: str, in_bytes: bool, disable: bool):
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        amount = (DownloadColumn(), TransferSpeedColumn()) if in_bytes else (MofNCompleteColumn(),)
        self.label = label
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), *amount, TimeRemainingColumn(),
                                 console=err, disable=disable, transient=True)
        self.task = None

    def start(self, total: int) -> None:
        self.task = self.progress.add_task(self.label, total=total)
        self.progress.start()

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def stage(self, text: str) -> None:
        """A step of unknown length: the bar pulses with ``text`` beside it."""
        if self.task is None:
            self.task = self.progress.add_task(text, total=None)
            self.progress.start()
        else:
            self.progress.update(self.task, description=text, total=None, completed=0)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.progress.stop()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


if __name__ == "__main__":
    main()
