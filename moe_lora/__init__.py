"""moe-lora: LoRA mixture-of-experts for PyTorch and Hugging Face transformers."""

from .adapter_io import MoELoRAModel, load_adapter, save_adapter
from .config import MoELoRAConfig
from .convert import convert, load_config, plan
from .errors import ConfigError
from .exporters import ExportRefused, export, mean_routing
from .interop import experts_from_peft, fixed_routing, merge_fixed_routing, upcycle_lora
from .layer import MoELoRALinear
from .model_hooks import set_task_ids
from .optim import param_groups
from .routing import Routing, iter_routed_modules
from .task_routing import task_routing
from .version import __version__

__all__ = [
    "ConfigError",
    "ExportRefused",
    "MoELoRAConfig",
    "MoELoRALinear",
    "MoELoRAModel",
    "Routing",
    "__version__",
    "convert",
    "experts_from_peft",
    "export",
    "fixed_routing",
    "iter_routed_modules",
    "load_adapter",
    "load_config",
    "mean_routing",
    "merge_fixed_routing",
    "param_groups",
    "plan",
    "save_adapter",
    "set_task_ids",
    "task_routing",
    "upcycle_lora",
]
