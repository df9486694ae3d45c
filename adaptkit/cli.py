"""The ``adaptkit`` command line: a thin shell over the library.

Every command parses its flags, calls one library function (``adaptkit.merge`` and friends) and
renders the result (rich tables, or one JSON object with ``--json``). Progress bars and warnings
come through a :class:`~adaptkit.reporting.Reporter`. Failures leave as one line on stderr
(:class:`Group`), naming the flag where the library names a parameter.
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
from .reporting import Reporter

# Piped output keeps whole module names (rich would otherwise cut tables at 80 columns). Markup is
# off: paths and tensor names may hold square brackets; colour comes from Text objects only.
stdout = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, markup=False, width=None if sys.stderr.isatty() else 200)

EXIT_STATUS = "Exit status: 0 done, 2 bad input or OS error (one line on stderr), 130/143 interrupted."
CHECK_STATUS = ("Exit status: 0 {what}, 1 {fail}, 2 bad input or OS error (one line on stderr), "
                "130/143 interrupted.")

# the library's parameter names as this CLI spells them (any other: --name-with-dashes)
FLAGS = {"weights": "--weight", "out": "--output", "checks": "--check", "adapters": "ADAPTER",
         "quant_settings": "--quant-config", "model": "--no-model", "to": "--to"}


def flag(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


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
            click.echo(f"error: {e.render(flag(e.param) if e.param else None)}", err=True)
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


class LazyChoice(click.Choice):
    """A choice among the names of a library registry, read when first needed (so ``adaptkit --help``
    does not import torch to list them)."""

    def __init__(self, load):
        self._load = load
        super().__init__([])

    @property
    def choices(self):
        return tuple(self._load())

    @choices.setter
    def choices(self, value):
        pass


def _methods():
    from .methods import METHODS

    return METHODS


def _runtimes():
    from .readiness import TARGETS

    return TARGETS


def _targets():
    from .formats import TARGETS

    return TARGETS


class Command(click.Command):
    """A command whose help ends with a list read from a library registry (``registry``: returns
    (name, text) pairs), so the CLI never retypes what the library declares."""

    def __init__(self, *args, registry=None, registry_title="", **kwargs):
        self.registry, self.registry_title = registry, registry_title
        super().__init__(*args, **kwargs)

    def format_epilog(self, ctx, formatter):
        if self.registry is not None:
            with formatter.section(self.registry_title):
                formatter.write_dl(list(self.registry()))
        super().format_epilog(ctx, formatter)


def device_option(help_text="Where the arithmetic runs: auto (CUDA when present), cpu, cuda or cuda:N."):
    return click.option("--device", default="auto", show_default=True, help=help_text)


def weight_option(help_text="Scale of each adapter's ΔW, once per adapter, in order (default 1)."):
    return click.option("--weight", "weights", type=float, multiple=True, help=help_text)


def dtype_option(help_text="Output dtype of floating tensors; auto keeps each tensor's own."):
    return click.option("--dtype", default="auto", show_default=True,
                        type=click.Choice(["auto", "float16", "bfloat16", "float32"]), help=help_text)


def report_option(what: str):
    return click.option("--report", "report_file", default=None,
                        help=f"Also draw {what} (.png, .svg or .html; needs adaptkit[plot]).")


def _plots_ready(path, inputs, param: str = "report") -> None:
    """Fail on a missing plot extra, a wrong suffix or a plot inside an input before the work."""
    if path:
        from . import plots

        plots.ready(path, param, [str(i) for i in inputs if i])


def _reported(result, report_file, draw: str, as_json: bool) -> bool:
    """Draw ``--report`` with ``adaptkit.plots.<draw>`` and print ``--json``; True when the JSON was
    printed (nothing else is rendered then)."""
    if report_file:
        from . import plots

        getattr(plots, draw)(result, report_file)
    if as_json:
        print_json(result.to_dict())
    return as_json


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")(f)


def force_option(f):
    return click.option("--force", is_flag=True, help="Replace OUT if it exists, once the new one is complete "
                                                      "(never an input).")(f)


class RichReporter(Reporter):
    """Progress bars (rich, on stderr, gone when done) and warnings for the CLI. A bar starts only once
    its total is known, so an error raised before prints alone."""

    def __init__(self, bars: bool = True, warnings: bool = True):
        self.bars, self.warnings = bars, warnings
        self.progress = None
        self.task = None

    def start(self, label: str, total: int | None, unit: str = "items") -> None:
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self.close()
        if not self.bars:
            return
        amount = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
        columns = (TextColumn("{task.description}"), BarColumn(), *(amount if total is not None else ()),
                   TimeRemainingColumn())
        self.progress = Progress(*columns, console=err, transient=True)
        self.task = self.progress.add_task(label, total=total)
        self.progress.start()

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def warn(self, message: str) -> None:
        if self.warnings:
            warn(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> "RichReporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def warn(message: str) -> None:
    err.print(styled("warning:", "yellow", f" {message}"), soft_wrap=True)


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _read_ahead(folder, adapters=()):
    """Start reading a local model folder's weights into the page cache (adaptkit/io/readahead.py),
    the local adapters' safetensors files first (an MoE expert LoRA is hundreds of MB, read where it is
    used); None when the base is not a local folder. Called before torch is imported: the disk works
    during the imports."""
    from .io.layout import find_weight_files
    from .io.readahead import Readahead

    if not Path(folder).is_dir():
        return None
    firsts = []
    for a in adapters:
        a = Path(a)
        firsts += sorted(a.glob("*.safetensors")) if a.is_dir() else [a] if a.suffix == ".safetensors" else []
    try:
        return Readahead.of_files(firsts + list(find_weight_files(folder).files)).start()
    except AdaptkitError:
        return None  # the merge itself reports what is wrong with the folder


def _tune_process() -> None:
    """Process-wide tuning a library call leaves alone: allocations above 1 MB straight from mmap, so
    module-sized temporaries do not pile up in glibc's arenas (adaptkit/io/pipeline.py)."""
    from .io.pipeline import limit_heap_growth

    limit_heap_growth()


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="adaptkit")
@click.option("-v", "--verbose", is_flag=True, help="Show the log lines of huggingface_hub, transformers and "
                                                    "bitsandbytes (quiet by default).")
def main(verbose):
    """Inspect, merge, combine, convert and verify LoRA adapters.

    Exact (fp32 math, rounded once), streaming (peak memory follows the largest tensor, not the
    model) and GPU-aware. Wherever a path is taken, a Hub id org/name[@revision] works too. Every
    command is also a Python function: adaptkit.merge(...), adaptkit.verify(...) (docs/python.md).
    Try it on the shipped fixtures:

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


@main.command(cls=Command, short_help="Show what a LoRA adapter holds, and where it will load.",
              registry=lambda: _runtimes().items(), registry_title="Runtimes (--check)",
              epilog=CHECK_STATUS.format(what="done (and every --check passes)", fail="a --check fails"))
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE [SOURCE ...]")
@click.option("--svd", is_flag=True, help="Add each module's singular values of ΔW (a spectrum drawn in block "
                                          "characters) and the ranks holding 90/99 % of its energy.")
@click.option("--plot", "plot_file", default=None,
              help="Draw what the adapters change (.png, .svg or .html): ‖ΔW‖ by layer × module kind and the "
                   "spectra per module kind; several SOURCEs side by side (needs adaptkit[plot]).")
@click.option("--compare", is_flag=True,
              help="Two SOURCEs: the cosine similarity of their ΔW, module by module (a table; with --plot, a "
                   "heatmap).")
@click.option("--check", "checks", multiple=True, type=LazyChoice(_runtimes),
              help="Say whether the adapter loads in this runtime, and how to fix it if not (repeatable).")
@click.option("--max-lora-rank", type=int, default=16, show_default=True, help="vLLM's --max-lora-rank, for --check vllm.")
@click.option("--base", default=None, metavar="BASE",
              help="The base model (folder or Hub id): tells what MoE expert LoRAs adapt from its checkpoint, and "
                   "lets --check leave out saved tensors that only repeat the base's (peft's embedding copy).")
@json_option
def inspect(sources, svd, plot_file, compare, checks, max_lora_rank, base, as_json):
    """Show what a LoRA adapter holds.

    SOURCE is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin), an
    mlx-lm folder, a single .safetensors file of LoRA tensors (PEFT or kohya names), or a Hub id
    org/name[@revision]. Prints a summary, one row per adapted module (named as in the base model)
    and health warnings: untrained B, NaN/Inf, shapes that do not fit, ranks that differ from the
    config, tensors that belong to no module.

    \b
    Examples:
      adaptkit inspect fixtures/adapters/llama-lora --svd
      adaptkit inspect fixtures/adapters/llama-lora fixtures/adapters/llama-dora --plot adapters.html
      adaptkit inspect fixtures/adapters/llama-lora fixtures/adapters/llama-rslora-patterns --compare
    """
    import adaptkit

    if compare and len(sources) != 2:
        raise AdaptkitError(f"compares two adapters, got {len(sources)}", param="compare")
    if len(sources) > 1 and not (plot_file or compare):
        raise AdaptkitError("several adapters are shown together with --plot or --compare", param="sources")
    if plot_file or compare:
        _inspect_many(sources, plot_file, compare, as_json)
        return
    source = sources[0]
    report = adaptkit.inspect(source, svd=svd, checks=checks, max_lora_rank=max_lora_rank, base=base)
    if as_json:
        print_json(report.to_dict())
    else:
        _render_inspect(report, svd)
        for r in report.checks:
            stdout.print()
            if r.ok:
                stdout.print(styled("ok", "green", f" {r.target}: the adapter should load"))
            for p in r.problems:
                stdout.print(styled("✗", "red", f" {r.target}: {p.rule}: {p.detail}\n    fix: {p.fix}"))
    if not all(r.ok for r in report.checks):
        sys.exit(1)


@main.command(short_help="Fold LoRA adapters into a base model.", epilog=EXIT_STATUS)
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...]")
@click.option("-o", "--output", "out", required=True,
              help="Folder to write the merged model to (created; refused if it exists, unless --force).")
@weight_option()
@device_option()
@dtype_option()
@click.option("--max-shard-size", default=None,
              help="Re-shard the output (e.g. 5GB, 500MB); by default the base's shard layout is kept.")
@click.option("--quantize", type=click.Choice(["nf4", "same", "fp8", "mxfp4"]), default=None,
              help="Write a quantized model. same (or the base's format: nf4, fp8, mxfp4) keeps a quantized base in "
                   "its format: merged layers requantized with its own scheme (block size, scale dtype), the rest "
                   "copied byte for byte. nf4 on a dense base quantizes it as transformers would. Without it a "
                   "quantized base is merged dense: bitsandbytes in its compute dtype, FP8/MXFP4 in the config's "
                   "dtype (bf16 by default).")
@click.option("--qlora", is_flag=True,
              help="Dense base: merge as QLoRA trained, onto each weight's 4-bit round trip (see docs/nf4.md).")
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default=None,
              help="For --qlora or --quantize on a dense base [default: nf4, or the --quant-config's].")
@click.option("--blocksize", type=int, default=None,
              help="For --qlora or --quantize on a dense base [default: 64, or the --quant-config's].")
@click.option("--double-quant/--no-double-quant", default=None,
              help="For --qlora or --quantize on a dense base [default: on, or the --quant-config's].")
@click.option("--quant-config", default=None,
              help="For --qlora or --quantize on a dense base: the settings from a JSON file, as "
                   "BitsAndBytesConfig.to_json_file writes it, or a 4-bit model's config.json (or its folder). "
                   "The flags above, when given, override it.")
@force_option
@json_option
def merge(base, adapters, out, weights, device, dtype, max_shard_size, quantize, qlora, quant_type, blocksize,
          double_quant, quant_config, force, as_json):
    """Fold LoRA adapters into a base model: W' = W + weight · (α/r) · B·A.

    BASE is a model folder in the Hugging Face layout (config.json with model.safetensors, sharded
    safetensors + index, or pytorch_model*.bin), or a Hub id. Each ADAPTER is a PEFT folder, a
    .safetensors file (raw PEFT names or kohya), an mlx-lm folder, or a Hub id; several are folded
    in order. ΔW is computed in fp32 and rounded once into the output dtype; DoRA, rsLoRA,
    rank/alpha patterns, Conv1D (GPT-2), embedding LoRA, modules_to_save and lora_bias follow
    peft's formulas.

    Streaming: one tensor at a time is read, merged and written; untouched tensors are copied
    file-to-file. Output goes to a temporary folder beside OUT, renamed into place at the end.

    Quantized bases: bitsandbytes 4-bit (NF4/FP4, dequantized by bitsandbytes), FP8 (quant_method
    fp8, block-wise or per tensor, as DeepSeek-V3 and Qwen3-FP8 ship; compressed-tensors FP8 per
    tensor, channel, group or block) and MXFP4 (gpt-oss experts) are merged into a dense model,
    dequant(W) + ΔW in fp32 rounded once; --quantize same keeps the base's format. The relative
    error each merged layer carries against the exact merge is reported.

    Today's families: LoRAs on MoE experts (peft target_parameters) land on each expert's on-disk
    tensors, or on fused ones (gpt-oss); vision-language models' in-memory names are mapped to the
    checkpoint's with transformers' rules; split q/k/v LoRAs merge into Phi-3's fused qkv_proj and
    the reverse.

    \b
    Examples:
      adaptkit merge fixtures/tiny-llama fixtures/adapters/llama-lora -o out/merged
      adaptkit merge fixtures/tiny-qwen3-moe fixtures/adapters/qwen3-moe-experts -o out/moe
      adaptkit merge FP8_BASE ADAPTER -o out/dense           (bf16)
      adaptkit merge FP8_BASE ADAPTER -o out/fp8 --quantize same
    """
    ahead = _read_ahead(base, adapters)  # before torch is imported: the disk works during the imports
    try:
        import adaptkit

        settings = None
        if qlora or quantize == "nf4":
            settings = adaptkit.QuantSettings.load(quant_config, quant_type=quant_type, blocksize=blocksize,
                                                   double_quant=double_quant,
                                                   compute_dtype=None if dtype == "auto" else dtype)
        elif quant_config or quant_type or blocksize is not None or double_quant is not None:
            raise AdaptkitError("is for --qlora or --quantize nf4", param="quant_settings")
        _tune_process()
        with RichReporter(bars=not as_json) as reporter:
            result = adaptkit.merge(base, list(adapters), out, weights=list(weights) or None, device=device,
                                    dtype=dtype, max_shard_size=max_shard_size, quantize=quantize, qlora=qlora,
                                    quant_settings=settings, force=force, reporter=reporter)
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


@main.command(cls=Command, short_help="Move an adapter between layouts without changing its ΔW.",
              registry=lambda: [(name, t.summary) for name, t in _targets().items()], registry_title="Formats (--to)",
              epilog=EXIT_STATUS)
@click.argument("source")
@click.option("--to", "to", required=True, type=LazyChoice(_targets), help="The format to write (below).")
@click.option("-o", "--output", "out", required=True, help="A folder for --to peft, mlx and vllm, a file otherwise.")
@click.option("--base", default=None, help="The base model: maps kohya names (underscores) back to module names, "
                                           "gives gguf (required) and mlx their model config, and lays the LoRA out "
                                           "as the base stores its projections (split q/k/v LoRA onto Phi-3's fused "
                                           "qkv_proj, or the reverse), every ΔW kept.")
@click.option("--initial", default=None,
              help="For an adapter whose initialisation rewrote the base (PiSSA, OLoRA, CorDA…): the adapter saved "
                   "right after initialisation. Writes the plain LoRA (rank 2r) that applies to the original base.")
@dtype_option("Tensor dtype of a peft, raw or kohya output; auto keeps the adapter's own.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16"]), default="f32", show_default=True,
              help="Tensor type of a GGUF adapter.")
@click.option("--prefix", default="lora_te_", show_default=True, help="Name prefix of a kohya output.")
@click.option("--pad-rank", type=int, default=None,
              help="For --to vllm: zero-pad every module to this rank (exact), e.g. the one a server runs with.")
@force_option
@json_option
def convert(source, to, out, base, initial, dtype, outtype, prefix, pad_rank, force, as_json):
    """Move an adapter between layouts without changing its ΔW.

    SOURCE is a PEFT folder (safetensors or legacy .bin), a raw .safetensors file with PEFT names,
    a kohya file (lora_te_/lora_unet_ names, .lora_down/.lora_up/.alpha), an mlx-lm folder, or a Hub
    id. Each module keeps its exact scaling: kohya files get a per-module alpha (rsLoRA and
    rank/alpha patterns included); PEFT folders get rank_pattern/alpha_pattern where modules
    differ; GGUF (llama.cpp), MLX and vLLM outputs hold one alpha or scale, so each module's own
    scaling is folded into its lora_b (MLX: smaller ranks zero-padded to one, DoRA as mlx-lm's dora,
    num_layers from --base). Without a config or alphas, alpha = r is assumed, with a warning.

    \b
    Examples:
      adaptkit convert fixtures/adapters/llama-lora --to kohya -o out/llama-lora.safetensors
      adaptkit convert out/llama-lora.safetensors --to peft -o out/llama-lora-peft
      adaptkit convert some-kohya.safetensors --to peft --base path/to/base -o out/adapter
      adaptkit convert fixtures/adapters/llama-rslora-patterns --to vllm -o out/for-vllm
      adaptkit convert fixtures/adapters/llama-rslora-patterns --to mlx --base fixtures/tiny-llama -o out/mlx
    """
    import adaptkit

    result = adaptkit.convert(source, out, to=to, base=base, initial=initial, dtype=dtype, outtype=outtype,
                              prefix=prefix, pad_rank=pad_rank, force=force, reporter=RichReporter(bars=False))
    if as_json:
        print_json(result.to_dict())
    else:
        stdout.print(f"converted {result.modules} modules ({result.source_format} → {result.to}) → {result.out}")


@main.command(cls=Command, short_help="Fuse several LoRA adapters into one, on exact deltas.",
              registry=lambda: [(n, m.summary + (f" {m.paper}" if m.paper else "")) for n, m in _methods().items()],
              registry_title="Methods (--method)", epilog=EXIT_STATUS)
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...]")
@click.option("--method", required=True, type=LazyChoice(_methods),
              help="How the per-module deltas ΔWᵢ = sᵢ·Bᵢ·Aᵢ are combined (below).")
@weight_option("Weight of each adapter, once per adapter, in order (default 1).")
@click.option("--weights", "weights_csv", default=None, hidden=True, help="Comma-separated weights (old spelling).")
@click.option("--density", type=float, default=None,
              help="Fraction of entries kept, for the pruning methods [default: the method's, 0.5].")
@click.option("--majority-sign", default="total", show_default=True, type=click.Choice(["total", "frequency"]),
              help="TIES sign election: sign of the weighted sum, or the most frequent sign.")
@click.option("--rank", type=int, default=None, help="Rank of the output (best rank-R approximation, per module).")
@click.option("--energy", type=float, default=None,
              help="Per module, the smallest rank keeping this fraction of ‖ΔW‖² (e.g. 0.99).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the DARE masks (per module).")
@device_option()
@click.option("-o", "--output", "out", required=True, help="Output folder.")
@click.option("--base", default=None, help="Merge the combination into this base model instead of writing an adapter.")
@dtype_option("With --base: output dtype of floating tensors; auto keeps each tensor's own.")
@click.option("--max-shard-size", default=None, help="With --base: re-shard the merged model (e.g. 5GB).")
@report_option("the energy each module kept and, for pruning methods, the share of entries kept")
@force_option
@json_option
def combine(adapters, method, weights, weights_csv, density, majority_sign, rank, energy, seed, device, out, base,
            dtype, max_shard_size, report_file, force, as_json):
    """Fuse several LoRA adapters into one, on exact deltas.

    Every method works on each module's full ΔWᵢ = sᵢ·Bᵢ·Aᵢ (peft's add_weighted_adapter works on
    A and B separately for linear/TIES/DARE, which adds cross terms Bᵢ·Aⱼ), then factors the result
    back into a LoRA with a truncated SVD (the best rank-R approximation), reporting the energy kept.

    One adapter with --method linear --rank R gives its best rank-R approximation (e.g. to fit
    vLLM's max_lora_rank). Without --rank/--energy, pruned methods keep the largest input rank. DARE
    masks are seeded per (--seed, module name): the same seed gives identical files on any device.

    \b
    Example:
      adaptkit combine fixtures/adapters/llama-lora fixtures/adapters/llama-rslora-patterns \\
          --method ties --density 0.5 --rank 8 -o out/combined
    """
    import adaptkit

    if weights_csv is not None:
        try:
            weights = [float(x) for x in weights_csv.split(",")]
        except ValueError:
            raise AdaptkitError(f"must be comma-separated numbers, got {weights_csv!r}", param="weights") from None
    _plots_ready(report_file, [*adapters, base])
    _tune_process()
    with RichReporter(bars=not as_json) as reporter:
        result = adaptkit.combine(list(adapters), out, method=method, weights=list(weights) or None, density=density,
                                  majority_sign=majority_sign, rank=rank, energy=energy, seed=seed, device=device,
                                  base=base, dtype=dtype, max_shard_size=max_shard_size, force=force,
                                  reporter=reporter)
    if _reported(result, report_file, "plot_combine", as_json):
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


@main.command(short_help="A LoRA from a fine-tuned model: its change, factored per module.", epilog=EXIT_STATUS)
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--output", "out", required=True, help="The PEFT adapter folder to write.")
@click.option("--rank", type=int, default=None, help="One rank for every module: the best rank-R approximation of ΔW.")
@click.option("--energy", type=float, default=None,
              help="Instead of --rank: per module, the smallest rank keeping this share of ‖ΔW‖² (e.g. 0.9).")
@click.option("--max-rank", type=int, default=None, help="With --energy: the largest rank a module may take.")
@click.option("--embeddings", type=click.Choice(["save", "factor"]), default="save", show_default=True,
              help="Changed embeddings and output head: saved whole (modules_to_save) or factored into LoRAs "
                   "too (a resized vocabulary is always saved whole).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Dtype of the factors written.")
@click.option("--include", default=None, help="Only tensors whose name matches this regular expression.")
@click.option("--exclude", default=None, help="No tensor whose name matches this regular expression.")
@device_option()
@report_option("the energy each module kept and its rank, by layer and module kind")
@force_option
@json_option
def extract(base, finetuned, out, rank, energy, max_rank, embeddings, dtype, include, exclude, device, report_file,
            force, as_json):
    """A LoRA from a fine-tuned model: OUT + BASE ≈ FINETUNED, as close as the rank allows.

    For every tensor that differs, ΔW = W_ft − W_base (fp32) is factored into its best rank-R
    approximation (truncated SVD, randomized where R ≪ min(out, in)), with lora_alpha = r so peft
    loads it as is. Each module's share of ‖ΔW‖² kept is reported (a warning below 90 %). Norms,
    other 1-D tensors, embeddings and the head (unless --embeddings factor) and a resized
    vocabulary are saved whole (modules_to_save); identical tensors are skipped. Both models are
    streamed tensor by tensor. BASE and FINETUNED are model folders or Hub ids.

    \b
    Examples:
      adaptkit extract BASE FINETUNED -o my-lora --rank 16
      adaptkit extract BASE FINETUNED -o my-lora --energy 0.9 --max-rank 64
      adaptkit verify BASE my-lora FINETUNED --tolerance 0.05   (how close base + LoRA comes)
    """
    import adaptkit

    _plots_ready(report_file, [base, finetuned])
    _tune_process()
    with RichReporter(bars=not as_json) as reporter:
        result = adaptkit.extract(base, finetuned, out, rank=rank, energy=energy, max_rank=max_rank,
                                  embeddings=embeddings, dtype=dtype, include=include, exclude=exclude, device=device,
                                  force=force, reporter=reporter)
    if _reported(result, report_file, "plot_extract", as_json):
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("module", "kind", "rank", "energy kept", "rel. error"):
        table.add_column(col, justify="left" if col in ("module", "kind") else "right", no_wrap=True)
    for m in result.modules:
        kept = "saved whole" if m.kind == "saved" else f"{100 * m.energy:.2f} %"
        table.add_row(m.name, m.kind, str(m.rank) if m.rank else "-", kept,
                      "-" if m.kind == "saved" else f"{m.rel_error:.2e}")
    stdout.print(table)
    loras = result.lora_modules
    summary = (f"; energy kept: worst {100 * result.worst_energy:.2f} %, median {100 * result.median_energy:.2f} %"
               if loras else "")
    stdout.print(f"extracted {len(loras)} LoRA modules and {len(result.modules) - len(loras)} saved whole "
                 f"({result.identical} tensors unchanged) → {result.out} ({_human_bytes(result.bytes_written)} in "
                 f"{result.seconds:.1f} s on {result.device}{summary})")


@main.command(short_help="Prove that a merged model equals base + adapters.",
              epilog=CHECK_STATUS.format(what="verified", fail="not verified"))
@click.argument("base")
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER [ADAPTER ...] MERGED")
@weight_option("The --weight each adapter was merged with, once per adapter, in order (default 1).")
@click.option("--prompts", default=None,
              help="A text file, one prompt per line, for the model-level check (default: random token ids).")
@device_option("Where the arithmetic runs: auto (CUDA when present), cpu, cuda or cuda:N (for verify: the "
               "model-level check; the layer probes run on the CPU).")
@click.option("--tolerance", type=float, default=None,
              help="Largest relative error a module may show (default: 3x the rounding noise of the output dtype).")
@click.option("--no-model", is_flag=True, help="Skip the model-level check (it loads the model twice).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probes and random prompts.")
@click.option("--write-report", is_flag=True,
              help="Save the report as adaptkit_verify.json in MERGED (a local folder); `adaptkit push` then puts "
                   "its numbers in the model card.")
@report_option("each tensor's error against what it is allowed, so a near-miss stands out")
@json_option
def verify(base, paths, weights, prompts, device, tolerance, no_model, seed, write_report, report_file, as_json):
    """Prove that MERGED equals BASE + ADAPTERs.

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
    import adaptkit

    if len(paths) < 2:
        raise AdaptkitError("give the adapter(s) and then the merged model folder", param="adapters")
    lines = None
    if prompts:
        from .io.files import read_bytes

        text = read_bytes(prompts, 16 << 20, "prompts file").decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    _plots_ready(report_file, [base, *paths])
    with RichReporter(bars=not as_json, warnings=False) as reporter:  # warnings come after the table
        report = adaptkit.verify(base, list(paths[:-1]), paths[-1], weights=list(weights) or None, prompts=lines,
                                 device=device, tolerance=tolerance, model=not no_model, seed=seed,
                                 write_report=write_report, reporter=reporter)
    if not _reported(report, report_file, "plot_verify", as_json):
        _render_verify(report)
    sys.exit(0 if report.ok else 1)


@main.command(short_help="Download an adapter or a model from the Hub.", epilog=EXIT_STATUS)
@click.argument("repo")
@click.option("-o", "--output", "out", default=None, help="Download into this folder instead of the Hugging Face cache.")
@click.option("--adapter-only", is_flag=True, help="Only the adapter files (config, weights, card).")
@click.option("--repo-type", default="model", show_default=True, type=click.Choice(["model", "dataset", "space"]))
@json_option
def pull(repo, out, adapter_only, repo_type, as_json):
    """Download an adapter or a model from the Hub: REPO is org/name[@revision].

    Only what matters comes down (adapter config and weights; for a model also config, tokenizer,
    safetensors and index; never .bin when safetensors exist). Prints the local path. With
    HF_HUB_OFFLINE=1 it answers from the cache. Every command also takes a Hub id where it takes a
    path, through this same code.
    """
    import adaptkit

    result = adaptkit.pull(repo, out=out, adapter_only=adapter_only, repo_type=repo_type, progress=not as_json)
    if as_json:
        print_json(result.to_dict())
    else:
        click.echo(result.path)


@main.command(short_help="Upload a folder to the Hub, with a model card.", epilog=EXIT_STATUS)
@click.argument("folder")
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to commit to (created if needed).")
@click.option("--message", default=None, help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@json_option
def push(folder, repo, private, revision, message, create_pr, as_json):
    """Upload FOLDER to the Hub repo REPO (org/name) in one commit, creating the repo if needed.

    Large files take the Hub's normal large-file path. If FOLDER has no README.md, a model card is
    added: base_model, library_name (peft for adapters, transformers for models), tags, and how the
    folder was produced. The token comes from HF_TOKEN or `hf auth login`; it is never printed.
    """
    import adaptkit

    result = adaptkit.push(folder, repo, private=private, revision=revision, message=message, create_pr=create_pr)
    if as_json:
        print_json(result.to_dict())
    else:
        where = result.pull_request or result.url
        card = " (model card generated)" if result.card_generated else ""
        stdout.print(f"pushed {len(result.files)} files to {result.repo_id} @ {result.commit[:10]}{card}: {where}")


def _inspect_many(sources, plot_file, compare: bool, as_json: bool) -> None:
    """--plot and --compare: the figures and the cosine table (adaptkit.plots)."""
    import adaptkit
    from adaptkit import plots

    _plots_ready(plot_file, sources, "plot")
    if compare:
        a, b = (adaptkit.load_adapter(s) for s in sources)
        cos = plots.cosine(a, b)
        if not cos:
            raise AdaptkitError("the two adapters share no module of the same shape: nothing to compare",
                                param="compare")
        if plot_file:
            plots.plot_compare(a, b, plot_file)
        if as_json:
            print_json({"cosine": cos, "plot": plot_file})
            return
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("module", no_wrap=True)
        table.add_column("cosine", justify="right")
        for name, c in cos.items():
            table.add_row(name, f"{c:+.4f}")
        stdout.print(table)
        stdout.print(f"{len(cos)} modules in common; mean cosine {sum(cos.values()) / len(cos):+.4f}"
                     + (f" → {plot_file}" if plot_file else ""))
        return
    reports = [adaptkit.inspect(s, svd=True) for s in sources]
    plots.plot_inspect(reports, plot_file)
    if as_json:
        print_json({"plot": plot_file, "adapters": [r.path for r in reports]})
    else:
        stdout.print(f"{len(reports)} adapter{'s' if len(reports) > 1 else ''} drawn → {plot_file}")


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
        ("target parameters", ", ".join(report.target_parameters) or "-"),
        ("modules to save", ", ".join(report.modules_to_save) or "-"),
        ("trainable tokens", "; ".join(f"{m}: {ids}" for m, ids in report.trainable_tokens.items()) or "-"),
        ("aLoRA invocation", str(report.alora_invocation_tokens) if report.alora_invocation_tokens else "-"),
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
        table.add_column("spectrum", no_wrap=True)
    for m in report.modules:
        kind = m.kind + (f" ×{m.experts} experts" if m.experts > 1 else "") + (" +DoRA" if m.dora else "") \
            + (" +bias" if m.lora_bias else "")
        row = [m.name, kind, str(m.rank), f"{m.alpha:g}", f"{m.scaling:.4g}", str(m.in_features), str(m.out_features)]
        if svd:
            from .plots import sparkline

            row += [str(m.rank_90), str(m.rank_99), f"{m.singular_values[0]:.4g}" if m.singular_values else "-",
                    sparkline(m.singular_values or [], width=32)]
        table.add_row(*row)
    stdout.print()
    stdout.print(table)
    for w in report.warnings:
        warn(w)


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
        if m.compared.startswith("logits"):
            what = (f"max |Δlogits| {m.max_abs_logit_diff:.3g}, mean KL {m.mean_kl:.3g} (worst {m.max_kl:.3g}), top-1 agreement "
                    f"{100 * m.top1_agreement:.2f} %")
        else:
            what = f"max |Δ| {m.max_abs_logit_diff:.3g}"
        stdout.print((styled("ok", "green") if m.ok else styled("FAIL", "red")) + Text(
            f" model level ({m.prompts} prompts, {m.tokens} tokens, {m.source}; {m.compared}): {what}"))
    for w in report.warnings:
        warn(w)
    failed = [m.name for m in report.modules if not m.ok] + report.untouched_mismatched
    if report.ok:
        stdout.print(styled("verified", "bold green", ": the merged model computes base + adapters"))
    else:
        stdout.print(styled("not verified", "bold red", f": {len(failed)} tensors fail"
                            + (f" (first: {failed[0]})" if failed else "")
                            + ("" if report.model is None or report.model.ok else "; logits differ")))


if __name__ == "__main__":
    main()
