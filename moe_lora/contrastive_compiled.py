"""The contrastive expert loss (moe_lora.losses: ``contrastive_loss`` on [S, O] outputs, ``contrastive_loss_lowrank``
on the [T, E, r] shrink) through torch.compile where a compiler is present and the rows are large enough for that to
pay, eager otherwise.

Legend: T tokens, K slots, S = T*K pairs, E experts, r rank, O output width. Each form is some 50 small ops on
[S, O], [E, T, r] or [E, T, E] tensors; on a CPU each eager op pays its OpenMP start-up and a pass over memory, and
inductor's C++ code fuses the elementwise chains and reductions around the GEMMs, forward and backward. The
compiled function is the eager one traced, so the value and the gradients agree to fp32 rounding.

``ContrastiveLoss`` picks the compiled function from ``min_elements`` of its largest input (u_SO for the outputs
form, h_TEr for the low-rank form; the rule below, measured by benchmarks/contrastive_compiled.py) on CPU tensors
outside another compiled graph, and falls back to eager otherwise: no compiler, a compile error (warned once, eager
from then on), small inputs, CUDA tensors, or ``compile=False``. ``compile_seconds`` adds up the first call of each
new input shape (tracing, code generation, the C++ build of the forward graph; AOTAutograd compiles the backward
graph at the first backward, which it does not see), apart from the steps that follow.

torch.compile caches per code object, so every instance shares the compiled graphs of one form (a model's routed
modules of one size compile once); ``dynamic=None`` compiles a static graph for the first T and one with a symbolic
T after a change. Copies (``copy.deepcopy``, pickling) drop the compiled functions.
"""

from __future__ import annotations

import time
import warnings

import torch

from .losses import contrastive_loss, contrastive_loss_lowrank

#: Compile from this many elements of the largest input (u_SO [S, O] or h_TEr [T, E, r]). Measured with
#: benchmarks/contrastive_compiled.py (E = 8, K = 2, r = 8, O = 512, 2 CPU threads on a machine loaded by other
#: jobs; results/contrastive_compiled_lowrank.json, _outputs.json): compiled/eager forward + backward x0.91 at 8K
#: elements (low-rank, T = 128), x0.76 at 64K (low-rank, T = 1024: the tiny Llama's step), x0.55 at 131K and x0.75
#: at 1M (outputs, S = 256 and 2048); the first call (the compilation) took 42-67 s. Below 64K the step gains
#: little against that one-off cost (and tests at tiny sizes stay eager).
MIN_COMPILED_ELEMENTS = 1 << 16


def _outputs_form(u_SO, ids_S, pair_weight_S, num_experts: int, temperature: float):
    return contrastive_loss(u_SO, ids_S, num_experts, temperature, pair_weight_S)


def _lowrank_form(h_TEr, ids_TK, lora_B_EOR, pair_weight_TK, scaling: float, temperature: float):
    return contrastive_loss_lowrank(h_TEr, ids_TK, lora_B_EOR, scaling, temperature, pair_weight_TK)


class ContrastiveLoss:
    """``contrastive_loss`` (``outputs``) and ``contrastive_loss_lowrank`` (``lowrank``), compiled where that pays.

    Args:
        min_elements: elements of the largest input from which the compiled function is used.
        compile: False never compiles (the eager losses only).
        dynamic: torch.compile's ``dynamic`` (None: static for the first shape, symbolic sizes after a change).
    """

    def __init__(
        self, *, min_elements: int = MIN_COMPILED_ELEMENTS, compile: bool = True, dynamic: bool | None = None
    ) -> None:
        self.min_elements = min_elements
        self.dynamic = dynamic
        self.compile_seconds = 0.0
        self.failure: str | None = None if compile else "compile=False"
        self._compiled: dict[str, object] = {}
        self._seen: set[tuple] = set()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compiled": {}, "_seen": set()}

    def uses_compiled(self, x: torch.Tensor) -> bool:
        """The cost rule on the largest input x: a CPU tensor of at least ``min_elements``, not already inside a
        torch.compile graph, and compilation has not failed here before."""
        return (
            self.failure is None
            and x.device.type == "cpu"
            and x.numel() >= self.min_elements
            and not torch.compiler.is_compiling()
        )

    def outputs(
        self,
        u_SO: torch.Tensor,
        expert_ids_S: torch.Tensor,
        num_experts: int,
        temperature: float = 0.1,
        pair_weight_S: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``losses.contrastive_loss`` (same arguments)."""
        args = (u_SO, expert_ids_S, pair_weight_S, num_experts, temperature)
        return self._run("outputs", _outputs_form, u_SO, args)

    def lowrank(
        self,
        h_TEr: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        lora_B_EOR: torch.Tensor,
        scaling: float,
        temperature: float = 0.1,
        pair_weight_TK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``losses.contrastive_loss_lowrank`` (same arguments)."""
        args = (h_TEr, expert_ids_TK, lora_B_EOR, pair_weight_TK, scaling, temperature)
        return self._run("lowrank", _lowrank_form, h_TEr, args)

    def _run(self, form: str, eager, largest: torch.Tensor, args: tuple) -> torch.Tensor:
        if not self.uses_compiled(largest):
            return eager(*args)
        tensors = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        key = (form, tensors, torch.is_grad_enabled())
        first = key not in self._seen
        start = time.perf_counter()
        try:
            if form not in self._compiled:
                self._compiled[form] = torch.compile(eager, fullgraph=True, dynamic=self.dynamic)
            out = self._compiled[form](*args)
        except Exception as exc:  # no C++ compiler, an unsupported op, ...: eager from now on, said once
            self.failure = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            warnings.warn(f"ContrastiveLoss: torch.compile failed, using eager ({self.failure})", stacklevel=3)
            return eager(*args)
        if first:
            self._seen.add(key)
            self.compile_seconds += time.perf_counter() - start
        return out
