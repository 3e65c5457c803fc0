"""Launcher entry script: one process per rank.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 training/train.py --config configs/train_tiny.yaml \
        [--set train.max_steps=20 --set ep_size=2 ...]
    torchrun --nproc_per_node 2 training/train.py --config ...          (also works)
    deepspeed --hostfile hostfile --no_ssh --node_rank i --master_addr NODE0 --master_port 29500 \
        training/train.py --config ...                                    (node i of several, no ssh; README)

The launcher runs this file as a script, so it imports the package by its installed name
(``moe_lora.training``) and first drops its own folder from sys.path: the folder's modules (data, model,
checkpoint, ...) must not shadow top-level modules of other packages.
Exit codes: 0 done, 2 invalid recipe or data (one message listing every problem) or an output_dir another run
holds, 3 NaN/inf loss (train.on_nonfinite: error; the message names the layer), 4 no optimizer step applied or
train.on_unhealthy: error found a problem (training/health.py), 1 a full disk (the message says what survived)
or anything else.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train MoE-LoRA adapters with DeepSpeed (one process per rank).")
    parser.add_argument("--config", required=True, help="training recipe YAML (see configs/train_tiny.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.max_steps=20 (value parsed as YAML)",
    )
    parser.add_argument(
        "--local_rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher (unused: LOCAL_RANK is read from the environment)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from moe_lora.errors import ConfigError, RunError
    from moe_lora.training.distributed import finish_distributed
    from moe_lora.training.recipe import parse_override
    from moe_lora.training.trainer import run_training

    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        result = run_training(args.config, overrides)
        finish_distributed()
        if int(os.environ.get("RANK", "0")) == 0:  # one summary for the whole run
            from moe_lora.training.progress import summary_line

            print(summary_line(result), flush=True)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"training/train.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # moe_lora.numerics.NonFiniteError: NaN/inf, with where it appeared
        print(f"training/train.py: error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
        return 3
    except RunError as e:  # output_dir locked, disk full, training did not happen or diverged (health.py)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"training/train.py: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
