"""adaptkit: inspect, merge, combine, convert and verify LoRA adapters, exactly and in streaming."""

__version__ = "0.1.0"

__all__ = ["Adapter", "AdaptkitError", "LoraModule", "load_adapter", "__version__"]

_LAZY = {"Adapter": "adapter", "LoraModule": "adapter", "load_adapter": "adapter", "AdaptkitError": "errors"}


def __getattr__(name):
    """The public names, imported on first use: ``adaptkit --help`` and the CLI's start do not wait for torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
