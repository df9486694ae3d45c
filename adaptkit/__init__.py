"""adaptkit: inspect, merge, combine, convert and verify LoRA adapters, exactly and in streaming."""

__version__ = "0.1.0"

from .adapter import Adapter, LoraModule, load_adapter  # noqa: E402
from .errors import AdaptkitError  # noqa: E402

__all__ = ["Adapter", "AdaptkitError", "LoraModule", "load_adapter", "__version__"]
