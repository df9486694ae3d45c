"""adaptkit: inspect, merge, combine, convert and verify LoRA adapters, exactly and in streaming.

The commands of the ``adaptkit`` CLI are these functions; the CLI only parses and renders::

    >>> import adaptkit
    >>> result = adaptkit.merge("fixtures/tiny-llama", "fixtures/adapters/llama-lora", "out/doc-init", force=True)
    >>> result.modules_merged
    14

- :func:`merge`: fold adapters into a base model (dense, bitsandbytes 4-bit, QLoRA's round trip).
- :func:`combine`: fuse adapters (linear, TIES, DARE, magnitude pruning) on exact deltas.
- :func:`extract`: a LoRA from a fine-tuned model (truncated SVD of each ΔW, the error reported).
- :func:`convert`: move an adapter between PEFT, raw, kohya, GGUF and mlx-lm layouts.
- :func:`verify`: prove a merged model computes base + adapters.
- :func:`inspect`: what an adapter holds, its health, and where it will load.
- :func:`pull` / :func:`push`: adapters and models from and to the Hugging Face Hub.
- :func:`load_adapter`: an :class:`Adapter` to look into, or to pass to the functions above.

Each takes keyword options, returns a result object with ``to_dict()``, reports progress and
warnings to an optional :class:`Reporter`, and raises :class:`AdaptkitError` (one line) on bad input.
See docs/python.md.
"""

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use: `adaptkit --help` does not wait for torch)
_LAZY = {
    "merge": "commands.merge", "MergeResult": "commands.merge",
    "combine": "commands.combine", "CombineResult": "commands.combine",
    "extract": "commands.extract", "ExtractResult": "commands.extract",
    "convert": "commands.convert", "ConvertResult": "commands.convert",
    "verify": "commands.verify", "VerifyReport": "commands.verify",
    "inspect": "commands.inspect", "AdapterReport": "commands.inspect",
    "pull": "hub", "push": "hub", "PullResult": "hub", "PushResult": "hub",
    "load_adapter": "formats", "Adapter": "adapter", "LoraModule": "adapter",
    "QuantSettings": "quant", "Reporter": "reporting", "AdaptkitError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
