"""End-to-end training-step benchmark: a tiny Llama with adapters on q,k,v,o,gate,up,down (setup:
docs/ARCHITECTURE.md section 5).

    python benchmarks/e2e.py            # all contenders, 10 timed rounds (several minutes on 2 cores)
    python benchmarks/e2e.py --quick    # 2 layers, 128 tokens, 2 rounds: a CI smoke run
    python benchmarks/e2e.py --only topk,peft

Model: LlamaForCausalLM, 4 layers, hidden 512, FFN 1376, 8 heads, vocab 8000; batch 4 x 256 random tokens;
AdamW on the trainable parameters. Every contender is built in this one process and their steps alternate
(A B C ... A B C ...), warm-up excluded; the table reports the median per-round ratio to the frozen base, to
PEFT LoRA of the same active rank (r=16; r=32 for topk_e64: E=64, k=2, r=16) and to ``peft_compiled`` (the same
PEFT LoRA r=16 model under torch.compile: PEFT's best on this machine), the same ratio for forward + backward alone
(the optimizer step, which grows with the trainable parameters, is reported apart in ms), median step time,
tokens/s, forward-only (no grad) ratio to PEFT, memory, and compile time:

* ``saved MB``: bytes of the distinct storages autograd saves for backward in one step, parameters left out
  (activation memory; exact and repeatable, unlike process RSS on a shared CPU machine), measured with
  saved_tensors_hooks;
* ``state MB``: trainable parameters + gradients + AdamW's two moments (4 x 4 bytes per trainable parameter);
* ``compile s``: seconds a compiled contender spent compiling, apart from the timed steps (which never include
  it): the excess of its first training step and first inference over their medians (dynamo and inductor build
  the forward graphs there, and AOTAutograd the backward one at the first backward). Compiled contenders are
  ``peft_compiled`` and those of ours whose routed modules compiled something (``compile_seconds`` > 0: MixLoRA's
  pair chain, the contrastive loss, where their cost rules say so; their own count, the forward graphs only, is
  ``module_compile_s`` in the JSON). Before the timing every contender runs one training step and one inference
  outside the measurement, so that no compilation falls into the warm-up either.

"frozen base" runs forward and backward through the base model with no trainable parameter (the embedding
output requires grad, so the backward computes the same activation gradients a LoRA needs) and no optimizer.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_markers import write_between_markers

from moe_lora import MoELoRAConfig
from moe_lora.convert import convert
from moe_lora.zoo import load_model

from timing import alternate, median_ms, median_ratio

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MOE = dict(target_modules=TARGETS, num_experts=8, top_k=2, rank=8, alpha=16.0)
CONTENDERS = {
    "topk": MoELoRAConfig(**MOE),
    "soft": MoELoRAConfig(**MOE, router="soft"),
    "threshold": MoELoRAConfig(**MOE, router="threshold"),
    "contrastive": MoELoRAConfig(**MOE, router="contrastive"),
    "block": MoELoRAConfig(**MOE, router_scope="block"),
    "mixlora": MoELoRAConfig(**MOE, router_scope="block", ffn_experts=True),
    "mola_inv_tri": MoELoRAConfig(**{**MOE, "num_experts": "inverted_triangle", "expert_budget": 20}),
    "topk_e64": MoELoRAConfig(**{**MOE, "num_experts": 64, "rank": 16, "alpha": 32.0}),
}
#: Only with --only: the compiled contenders with torch_compile off, for a same-process A/B of the compiled paths
#: (MixLoRA's pair chain, the contrastive loss) against their eager code.
EAGER_TWINS = {
    "mixlora_eager": MoELoRAConfig(**MOE, router_scope="block", ffn_experts=True, torch_compile=False),
    "contrastive_eager": MoELoRAConfig(**MOE, router="contrastive", torch_compile=False),
}
#: The PEFT LoRA each contender is held against: the same active rank k*r (topk_e64: 2 x 16 = 32).
PEFT_OF = {"topk_e64": "peft_r32"}
#: Always built: the frozen base, PEFT LoRA r=16 eager and the same model under torch.compile.
FIXED = ("base", "peft", "peft_compiled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument(
        "--only", default="", help="comma-separated subset of: " + ",".join([*FIXED, *CONTENDERS, *EAGER_TWINS])
    )
    p.add_argument("--backend", default="auto", help="expert compute backend for ours (default auto)")
    p.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 64, 2 rounds: a smoke run")
    p.add_argument("--out", default="benchmarks/results/e2e.json", help="where to write the JSON table")
    p.add_argument(
        "--readme",
        default=None,
        metavar="PATH",
        help="also write the table into this markdown file, between the lines <!-- e2e-table --> and "
        "<!-- /e2e-table --> (make bench passes README.md)",
    )
    return p.parse_args(argv)


def markdown_table(rows: list[dict]) -> str:
    """The README's end-to-end table of ``rows`` (main's JSON rows)."""
    lines = [
        "| contender | x frozen base | x PEFT (same active rank) | x PEFT compiled | fwd+bwd x PEFT | ms/step | "
        "optimizer ms | tokens/s | inference x PEFT | saved MB | state MB | trainable | compile s |",
        "|---" * 13 + "|",
    ]
    for row in rows:
        vs = "" if row["peft_baseline"] == "peft" or row["name"].startswith("peft") else " (vs r=32)"
        name = "peft (r=16)" if row["name"] == "peft" else row["name"]
        pc = row.get("ratio_to_peft_compiled")
        compile_s = row.get("compile_s")
        lines.append(
            f"| {name} | {row['ratio_to_base']:.2f} | {row['ratio_to_peft']:.2f}{vs} | "
            f"{'' if pc is None else f'{pc:.2f}'} | "
            f"{row['fwd_bwd_ratio_to_peft']:.2f}{vs} | {row['median_ms']:.0f} | {row['optimizer_ms']:.0f} | "
            f"{row['tokens_per_s']:.0f} | {row['infer_ratio_to_peft']:.2f} | {row['saved_MB']:.0f} | "
            f"{row['state_MB']:.1f} | {row['trainable_params']:,} | {'' if not compile_s else f'{compile_s:.0f}'} |"
        )
    return "\n".join(lines)


def write_readme_table(path: Path, table: str) -> None:
    """Replace what lies between the e2e-table marker lines of ``path`` with ``table`` (atomically)."""
    write_between_markers(path, "e2e-table", table)


def build(name: str, args) -> torch.nn.Module:
    model = load_model("tiny-llama", vocab_size=8000, num_layers=args.layers, seed=0).train()
    if name == "base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if name in ("peft", "peft_r32", "peft_compiled"):
        import peft

        r = 32 if name == "peft_r32" else 16
        lora = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
        return torch.compile(lora) if name == "peft_compiled" else lora
    cfg = CONTENDERS.get(name) or EAGER_TWINS[name]
    cfg.backend = args.backend
    return convert(model, cfg)


def prime(names: list[str], train_step, infer_step) -> dict[str, tuple[float, float]]:
    """One training step and one inference of every contender, before anything is timed: compiled contenders build
    their graphs here. Returns {name: (seconds of that training step, of that inference)}. The training step's
    parts are dropped from the per-part lists (only the timed rounds' tail is read there anyway)."""
    first = {}
    for n in names:
        t0 = time.perf_counter()
        train_step(n)()
        t1 = time.perf_counter()
        infer_step(n)()
        first[n] = (t1 - t0, time.perf_counter() - t1)
        print(f"primed {n}: first training step {first[n][0]:.1f} s, first inference {first[n][1]:.1f} s", flush=True)
    return first


def module_compile_seconds(model: torch.nn.Module) -> float:
    """What the routed modules report as their compilation (``compile_seconds``: forward graphs)."""
    return sum(getattr(m, "compile_seconds", 0.0) for m in model.modules())


def compile_seconds(name: str, model: torch.nn.Module, first: dict, times: dict, infer: dict) -> float:
    """Compile time of a contender, apart from the steps (the module docstring's ``compile s``); 0 for eager ones."""
    if name != "peft_compiled" and module_compile_seconds(model) == 0.0:
        return 0.0
    train_s, infer_s = first[name]
    return max(0.0, train_s - median_ms(times, name) / 1e3) + max(0.0, infer_s - median_ms(infer, name) / 1e3)


def saved_bytes(step, model: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves for backward in one step, parameters left out: activation
    memory. Several saves of one tensor (x saved by two GEMMs) or of views into one storage count once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}  # holding each counted tensor: no address is reused while measuring
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen[key] = t
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.batch, args.seq, args.layers = 2, 2, 64, 2
    names = [*FIXED, *CONTENDERS]
    if args.only:
        wanted = args.only.split(",")
        allowed = [*names, *EAGER_TWINS]
        unknown = [n for n in wanted if n not in allowed]
        if unknown:
            raise SystemExit(f"--only: unknown contender(s) {unknown}; allowed: {', '.join(allowed)}")
        names = [n for n in allowed if n in wanted or n in FIXED]
    if any(n in PEFT_OF for n in names):
        names.insert(2, "peft_r32")
    torch.manual_seed(0)
    ids = torch.randint(0, 8000, (args.batch, args.seq))
    models = {n: build(n, args) for n in names}
    optims = {
        n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for n, m in models.items()
        if n != "base"
    }

    parts = {n: {"fwd_bwd": [], "optimizer": []} for n in names}  # seconds of each call's two parts

    def train_step(name):
        model, opt = models[name], optims.get(name)

        def run(backward=True):
            t0 = time.perf_counter()
            out = model(input_ids=ids, labels=ids)
            if backward:
                out.loss.backward()
                t1 = time.perf_counter()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                parts[name]["fwd_bwd"].append(t1 - t0)
                parts[name]["optimizer"].append(time.perf_counter() - t1)

        return run

    def infer_step(name):
        model = models[name]

        def run():
            with torch.no_grad():
                model(input_ids=ids)

        return run

    t0 = time.perf_counter()
    first = prime(names, train_step, infer_step)  # compilation happens here, outside every timed step
    times = alternate({n: train_step(n) for n in names}, rounds=args.rounds)
    fwd_bwd = {n: parts[n]["fwd_bwd"][-args.rounds :] for n in names}  # the timed rounds (warm-up dropped)
    optimizer = {n: parts[n]["optimizer"][-args.rounds :] for n in names}
    infer = alternate({n: infer_step(n) for n in names}, rounds=args.rounds)
    tokens = args.batch * args.seq
    rows = []
    print(
        f"tiny Llama {args.layers} layers, hidden 512, batch {args.batch} x {args.seq}, {args.rounds} rounds "
        f"alternated; {torch.get_num_threads()} threads"
    )
    print(
        f"{'contender':<14} {'x base':>7} {'x PEFT':>7} {'x PEFTc':>7} {'fwd+bwd x':>9} {'ms/step':>8} "
        f"{'opt ms':>7} {'tok/s':>7} {'infer x PEFT':>12} {'saved MB':>9} {'state MB':>9} {'trainable':>10} "
        f"{'compile s':>9}"
    )
    for n in names:
        model = models[n]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        peft_name = PEFT_OF.get(n, "peft")
        row = {
            "name": n,
            "peft_baseline": peft_name,
            "ratio_to_base": median_ratio(times, n, "base"),
            "ratio_to_peft": median_ratio(times, n, peft_name),
            "ratio_to_peft_compiled": median_ratio(times, n, "peft_compiled"),
            "fwd_bwd_ratio_to_peft": median_ratio(fwd_bwd, n, peft_name),
            "optimizer_ms": median_ms(optimizer, n),
            "median_ms": median_ms(times, n),
            "tokens_per_s": tokens / (median_ms(times, n) / 1e3),
            "infer_ratio_to_peft": median_ratio(infer, n, peft_name),
            "saved_MB": saved_bytes(train_step(n), model) / 2**20,
            "state_MB": 16 * trainable / 2**20,
            "trainable_params": trainable,
            "compile_s": compile_seconds(n, model, first, times, infer),
            "module_compile_s": module_compile_seconds(model),
        }
        rows.append(row)
        print(
            f"{n:<14} {row['ratio_to_base']:>7.2f} {row['ratio_to_peft']:>7.2f} "
            f"{row['ratio_to_peft_compiled']:>7.2f} {row['fwd_bwd_ratio_to_peft']:>9.2f} {row['median_ms']:>8.0f} "
            f"{row['optimizer_ms']:>7.1f} {row['tokens_per_s']:>7.0f} {row['infer_ratio_to_peft']:>12.2f} "
            f"{row['saved_MB']:>9.1f} {row['state_MB']:>9.1f} {trainable:>10,} {row['compile_s']:>9.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "seconds": time.perf_counter() - t0,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    if args.readme:
        write_readme_table(Path(args.readme), markdown_table(rows))
        print(f"wrote the table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
