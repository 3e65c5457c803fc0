"""One E=64, top-2, r=16 MoE-LoRA layer (the e2e ``topk_e64`` contender's shape) against PEFT LoRA r=32 (the
same active rank): where its time goes, and an A/B of this tree against an earlier commit.

    python benchmarks/e64.py --profile                 # torch.profiler breakdown: router / grid / expert GEMMs
    python benchmarks/e64.py --against HEAD~1          # this tree vs that commit vs PEFT r=32, steps alternated

Layer: nn.Linear(512, 512) + MoELoRALinear(E=64, k=2, r=16, alpha=32), T = 1024 tokens (the e2e batch 4 x 256),
fp32, training mode with the default auxiliary loss; a training step is forward + backward of (y * g).sum() +
aux loss with x requiring grad (mid-network), inference is a no-grad forward. lora_B ~ N(0, 0.02) so that every
gradient is non-trivial.

``--profile`` labels each aten op by the part of the layer that ran it, forward or backward (a backward op by the
forward op of its autograd node): ``base`` (the frozen Linear), ``router`` (logits GEMM, softmax, top-k and
their backward), ``aux`` (the auxiliary loss), ``experts`` (lora_experts: split into GEMM, gather/scatter,
metadata, fill/copy and elementwise ops), ``head`` (the test loss). Times are self CPU per step.

``--against REF`` extracts REF's ``moe_lora`` and ``kernels`` (``git archive``) into a temporary package, builds
its layer with this tree's weights and alternates old, new and PEFT steps in one process (timing.py): the
ratios are medians of per-round ratios. Writes benchmarks/results/e64.json (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import platform
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_lora import MoELoRALinear

from timing import alternate, median_ms, median_ratio

ROOT = Path(__file__).resolve().parent.parent

KINDS = {
    "GEMM": ("mm", "addmm", "bmm", "addmm_", "baddbmm", "_grouped_mm"),
    "gather/scatter": ("index_select", "scatter_add_", "index_add_", "scatter_", "scatter_add", "gather", "index"),
    "metadata": ("sort", "argsort", "bincount", "cumsum", "arange", "floor_divide", "nonzero", "index_fill_"),
    "fill/copy": ("fill_", "zero_", "zeros", "new_zeros", "empty", "copy_", "_to_copy", "clone"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of one layer step")
    p.add_argument("--against", default=None, metavar="REF", help="A/B this tree against git commit REF")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds of the A/B (default 30)")
    p.add_argument("--steps", type=int, default=20, help="profiled steps (default 20)")
    p.add_argument("--tokens", type=int, default=1024, help="T (default 1024)")
    p.add_argument("--out", default="benchmarks/results/e64.json", help="where to write the JSON")
    return p.parse_args(argv)


def make_layer(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = cls(nn.Linear(512, 512), num_experts=64, top_k=2, rank=16, alpha=32.0, init_seed=seed).train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed + 1))
    return layer


def make_peft() -> nn.Module:
    import peft

    model = peft.get_peft_model(
        nn.Sequential(nn.Linear(512, 512)), peft.LoraConfig(r=32, lora_alpha=64, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    layer.lora_B["default"].weight.data.normal_(0, 0.02)
    return layer


def steps(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """(training step, inference step) of ``module`` on x."""

    def train():
        xi = x.detach().requires_grad_(True)
        y = module(xi)
        loss = (y * g).sum()
        aux = getattr(module, "last_aux_loss", None)
        (loss if aux is None else loss + aux).backward()
        for p in module.parameters():
            p.grad = None

    def infer():
        with torch.no_grad():
            module(x)

    return train, infer


def kind_of(op: str) -> str:
    name = op.split("::")[-1]
    return next((k for k, names in KINDS.items() if name in names), "elementwise/other")


def profile_breakdown(x, g, n_steps: int) -> dict:
    """{mode: {"total_ms", "parts": {label: ms}, "kinds": {"label fwd|bwd kind": ms}, "top_ops": [...]}}."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import moe_lora.layer as layer_module

    layer = make_layer(MoELoRALinear)

    def labelled(label, fn):
        def call(*a, **k):
            with record_function("@" + label):
                return fn(*a, **k)

        return call

    real = layer_module.lora_experts
    layer_module.lora_experts = labelled("experts", real)
    layer.router.forward = labelled("router", layer.router.forward)
    layer.record = labelled("aux", layer.record)
    layer.base_layer.forward = labelled("base", layer.base_layer.forward)
    train, infer = steps(layer, x, g)
    out = {}
    try:
        for mode, fn in (("train", train), ("infer", infer)):
            for _ in range(5):
                fn()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(n_steps):
                    fn()
            out[mode] = summarise(prof.events(), n_steps)
    finally:
        layer_module.lora_experts = real
    return out


def _label(event) -> str | None:
    while event is not None:
        if event.name.startswith("@"):
            return event.name[1:]
        event = event.cpu_parent
    return None


def summarise(events, n_steps: int) -> dict:
    by_seq = {}
    for e in events:
        label = _label(e)
        if label and e.sequence_nr >= 0:
            by_seq.setdefault(e.sequence_nr, label)
    parts, kinds, ops = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        label, phase = _label(e), "fwd"
        if label is None:  # backward: the autograd node that ran it, named by its forward op's label
            node, phase = e, "bwd"
            while node is not None and not node.name.startswith("autograd::engine::evaluate_function"):
                node = node.cpu_parent
            label = by_seq.get(node.sequence_nr, "autograd") if node is not None else "other"
        us = e.self_cpu_time_total / n_steps
        parts[label] += us
        kinds[f"{label} {phase} {kind_of(e.name)}"] += us
        ops[f"{label} {phase} {e.name} {list(e.input_shapes)}"] += us
    return {
        "total_ms": sum(parts.values()) / 1e3,
        "parts": {k: v / 1e3 for k, v in parts.most_common()},
        "kinds": {k: v / 1e3 for k, v in kinds.most_common()},
        "top_ops": [[k, v / 1e3] for k, v in ops.most_common(25)],
    }


def load_tree(ref: str, into: Path):
    """MoELoRALinear of git commit ``ref``: its moe_lora/ and kernels/ as the package ``moe_lora_ref``."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "moe_lora", "kernels"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    package = into / "moe_lora_ref"
    (into / "moe_lora").rename(package)
    (into / "kernels").rename(package / "kernels")
    sys.path.insert(0, str(into))
    return importlib.import_module("moe_lora_ref.layer").MoELoRALinear


def ab(x, g, ref: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        old_cls = load_tree(ref, Path(tmp))
        old, new = make_layer(old_cls), make_layer(MoELoRALinear)
        new.load_state_dict(old.state_dict())
        contenders = {"old": old, "new": new, "peft_r32": make_peft()}
        result = {}
        for mode in ("train", "infer"):
            fns = {name: steps(m, x, g)[0 if mode == "train" else 1] for name, m in contenders.items()}
            times = alternate(fns, rounds=rounds)
            result[mode] = {
                "new_over_old": median_ratio(times, "new", "old"),
                "old_over_peft_r32": median_ratio(times, "old", "peft_r32"),
                "new_over_peft_r32": median_ratio(times, "new", "peft_r32"),
                "ms": {name: median_ms(times, name) for name in contenders},
            }
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.profile or args.against):
        raise SystemExit("give --profile, --against REF, or both")
    torch.manual_seed(0)
    x, g = torch.randn(args.tokens, 512), torch.randn(args.tokens, 512)
    report = {"args": vars(args), "torch": torch.__version__, "machine": platform.machine()}
    report["threads"] = torch.get_num_threads()
    if args.profile:
        report["profile"] = profile_breakdown(x, g, args.steps)
        for mode, p in report["profile"].items():
            print(f"{mode}: {p['total_ms']:.1f} ms/step self CPU ({report['threads']} threads)")
            for k, v in p["kinds"].items():
                if v >= 0.05:
                    print(f"  {k:<40} {v:7.2f} ms")
    if args.against:
        report["ab"] = ab(x, g, args.against, args.rounds)
        for mode, r in report["ab"].items():
            ms = ", ".join(f"{k} {v:.1f}" for k, v in r["ms"].items())
            print(
                f"{mode}: new/old {r['new_over_old']:.3f}; x PEFT r=32 old {r['old_over_peft_r32']:.3f} "
                f"new {r['new_over_peft_r32']:.3f} (median ms: {ms})"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
