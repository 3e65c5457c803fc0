"""The installed package's version (what saved adapters, reports and ``moe-lora --version`` record)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moe-lora")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
