"""MixLoRA's per-pair elementwise chain on [S, F] rows, fused by torch.compile where a compiler is present.

Legend: T tokens, K slots, S = T*K pairs, F the FFN width. With the base activations gathered to pair rows (u = W3 x,
g = W1 x), the experts' deltas (du, dg) and the routing weight w of each pair (moe_lora/block.py)::

    a0_SF = act(g_SF)                          the base gate, in the pair layout
    p_SF  = act(g_SF + dg_SF) * (u_SF + du_SF)  the pair's product (W2's experts read it)
    wd_SF = w_S1 * (p_SF - a0_SF * u_SF)        the weighted correction added back to the token's h

Eager PyTorch runs this as ~8 passes over [S, F] forward and ~14 backward (each op reads and writes S*F); on a
CPU at the sizes of a MixLoRA block-step they are memory-bound, and inductor's C++/OpenMP code fuses them into one
loop forward and one or two backward. ``PairChain`` picks the compiled function when the rows are large enough for
that to pay (the cost rule below, measured by benchmarks/pair_chain.py) and torch.compile works here, and falls back
to the eager function otherwise (no compiler, a compile error, small inputs, CUDA tensors). Both give p and wd to
fp32 rounding of each other; with du = dg = 0 both give wd == 0 exactly (the two act() calls see the same inputs
in the same loop).

Each ``MoEBlock`` in FFN mode owns one ``PairChain`` (no module-global state of ours). torch.compile's own cache is
per code object, so the blocks share their compiled graphs: activations of one class (every layer's SiLU module)
need one graph per grad mode, not one per layer. With ``dynamic=None`` (the default) the first S compiles a static
graph and the second S one graph with a symbolic S, which serves every later S: a training run with varying
token counts compiles at most twice per grad mode, far below dynamo's recompile limit.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

#: Compile only from this many elements of [S, F]. Measured with benchmarks/pair_chain.py (F = 1376, 2 shared CPU
#: cores, results/pair_chain.json): compiled/eager forward + backward x34 at S = 16 (22K elements: the compiled
#: call's overhead), x1.10 at S = 64 (88K), x0.15 at S = 256 (352K), x0.40 at S = 2048; with one torch thread
#: (results/pair_chain_1thread.json) x0.88 at S = 64, x0.43 at 256, x0.27 at 2048. The machine was shared by other
#: jobs (eager's OpenMP regions suffer most from that), so the ratios are wide; the rule keeps the safe side.
MIN_COMPILED_ELEMENTS = 1 << 18


def pair_chain(
    u_SF: torch.Tensor,
    g_SF: torch.Tensor,
    du_SF: torch.Tensor,
    dg_SF: torch.Tensor,
    w_S1: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_SF, wd_SF) of the module docstring, eager."""
    a0_SF = act(g_SF)
    p_SF = act(g_SF + dg_SF) * (u_SF + du_SF)
    return p_SF, w_S1 * (p_SF - a0_SF * u_SF)


class PairChain:
    """The chain for one activation, compiled on first use where that pays; ``compile_seconds`` reports the
    compilation (first calls of each new shape: dynamo's trace and the forward graph; AOTAutograd compiles the
    backward graph at the first backward, which it does not see) apart from the steps.

    Args:
        act: the FFN's activation (e.g. ``torch.nn.functional.silu``).
        min_elements: S*F from which the compiled function is used.
        compile: False never compiles (the eager fallback only).
        dynamic: torch.compile's ``dynamic`` (None: static for the first shape, symbolic S after a change).

    Copies (``copy.deepcopy``, pickling) drop the compiled function: a copy compiles again on its first call
    with its own activation.
    """

    def __init__(
        self,
        act: Callable[[torch.Tensor], torch.Tensor],
        *,
        min_elements: int = MIN_COMPILED_ELEMENTS,
        compile: bool = True,
        dynamic: bool | None = None,
    ) -> None:
        self.act = act
        self.min_elements = min_elements
        self.dynamic = dynamic
        self.compile_seconds = 0.0
        self.failure: str | None = None if compile else "compile=False"
        self._compiled = None
        self._seen: set[tuple] = set()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compiled": None, "_seen": set()}

    def _eager(self, u_SF, g_SF, du_SF, dg_SF, w_S1):
        return pair_chain(u_SF, g_SF, du_SF, dg_SF, w_S1, self.act)

    def uses_compiled(self, u_SF: torch.Tensor) -> bool:
        """The cost rule: CPU tensors, at least ``min_elements``, not already inside a torch.compile graph, and
        compilation has not failed here before."""
        return (
            self.failure is None
            and u_SF.device.type == "cpu"
            and u_SF.numel() >= self.min_elements
            and not torch.compiler.is_compiling()
        )

    def __call__(self, u_SF, g_SF, du_SF, dg_SF, w_S1) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.uses_compiled(u_SF):
            return self._eager(u_SF, g_SF, du_SF, dg_SF, w_S1)
        key = (tuple(u_SF.shape), u_SF.dtype, torch.is_grad_enabled())
        first = key not in self._seen
        start = time.perf_counter()
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self._eager, fullgraph=True, dynamic=self.dynamic)
            out = self._compiled(u_SF, g_SF, du_SF, dg_SF, w_S1)
        except Exception as exc:  # no C++ compiler, an unsupported act, ...: eager from now on, said once
            self.failure = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            warnings.warn(f"PairChain: torch.compile failed, using eager ({self.failure})", stacklevel=2)
            return self._eager(u_SF, g_SF, du_SF, dg_SF, w_S1)
        if first:
            self._seen.add(key)
            self.compile_seconds += time.perf_counter() - start
        return out
