"""moe-lora: LoRA mixture-of-experts for PyTorch and Hugging Face transformers."""

from importlib.metadata import PackageNotFoundError, version

from .config import MoELoRAConfig
from .errors import ConfigError
from .layer import MoELoRALinear
from .routing import Routing, iter_routed_modules

try:
    __version__ = version("moe-lora")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "MoELoRAConfig", "MoELoRALinear", "Routing", "__version__", "iter_routed_modules"]
