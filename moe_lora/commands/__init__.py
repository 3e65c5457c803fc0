"""Subcommands of the ``moe-lora`` CLI (see moe_lora/cli.py for the protocol)."""
