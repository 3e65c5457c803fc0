"""Grouped LoRA-expert compute in PyTorch: sort (token, slot) pairs by expert, grouped GEMMs, scatter back.

Forward, with the pairs sorted by expert (kernels/metadata.py)::

    x_SD  = x[tok_S]                                      gather (index_select)
    h_Sr  = x_SD @ A_e^T          per expert group        grouped_mm
    hs_Sr = h_Sr * s * w_S
    u_SO  = hs_Sr @ B_e^T         per expert group        grouped_mm
    y[t] += u_SO[s] for s of t                            index_add

Backward (closed form, docs/ARCHITECTURE.md section 4), g = dL/dy::

    g_SO  = g[tok_S];  z_Sr = g_SO @ B_e                  (grouped)
    dw_S  = s * <z, h>;  dh_Sr = s * w_S * z
    dx[t] = sum over t's pairs of dh_Sr @ A_e            (grouped, then index_add)
    dA_e  = dh_e^T x_e;  dB_e = g_e^T hs_e               (grouped 2d x 2d, one block per expert)

Only x, the routing and h are saved (x rows are gathered again in backward instead of keeping [S, D]). Rows are
gathered with ``index_select`` and the routing-weight gradient goes back to pair order through ``inv_S`` (a
gather, not an index_put). Going back to tokens, ``index_add_`` beat a gather in pair order plus a [T, K, N] sum
at E = 64 on one CPU thread (0.64x against 0.74x of the padded grid's time, benchmarks/README.md).
Which GEMM runs the groups:
* ``torch.nn.functional.grouped_mm`` (torch >= 2.9), one call per product and no host sync: on CUDA, and on a
  CPU that runs torch with one intra-op thread. It needs 16-byte aligned row strides (D, O and r multiples of 4
  in fp32, 8 in 16-bit) and fp32 or 16-bit tensors. Its CPU kernel (torch 2.13) is a C++ loop of one BLAS GEMM
  per group on exactly the S rows. With one thread that beats the padded grid below (E = 64, k = 2, r = 16,
  d = 512, T = 1024: forward + backward 0.64-0.77x its time, inference 0.72-0.83x). With more threads each
  small GEMM is a parallel region of its own, one thread synchronisation per group and product, where the
  grid's batched GEMM is one: on the shared 2-core machine (other jobs holding both cores) grouped_mm ran
  6-13x slower than with one thread and the grid won (benchmarks/README.md, "E=64: router GEMMs and the
  padded grid").
* Otherwise (several CPU threads, older torch, odd sizes, fp64): on the CPU batched GEMMs over a padded [E, C]
  grid (kernels/padded.py) while the routing is near balance, else a loop of BLAS matmuls over the expert
  groups. benchmarks/scaling.py measures the CPU path against the dense one (benchmarks/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metadata import SortMeta
from .padded import PAD_LIMIT, lora_experts_padded


def grouped_mm_usable(dtype: torch.dtype, *dims: int, device: torch.device | None = None) -> bool:
    """True when F.grouped_mm exists, is the faster choice on ``device`` (CUDA; see the module docstring) and
    every row stride is a multiple of 16 bytes. ``device=None`` checks only availability and alignment."""
    if device is not None and device.type != "cuda":
        return False
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = torch.tensor([], dtype=dtype).element_size()
    return all((d * size) % 16 == 0 for d in dims)


def resolve_grouped_mm(
    use_grouped_mm: bool | None, dtype: torch.dtype, D: int, O: int, r: int, device: torch.device
) -> bool:
    """Whether F.grouped_mm runs the lora_experts groups: where torch has it and the shapes allow when None
    (on CUDA, and on a CPU with one intra-op thread: the module docstring), else as forced (where the shapes
    allow)."""
    if use_grouped_mm is None:  # CUDA, and a CPU running one intra-op thread: see the module docstring
        cpu_single = device.type == "cpu" and torch.get_num_threads() == 1
        return (device.type == "cuda" or cpu_single) and grouped_mm_usable(dtype, D, O, r)
    return bool(use_grouped_mm) and grouped_mm_usable(dtype, D, O, r)


def group_mm(a: torch.Tensor, b: torch.Tensor, meta: SortMeta, use_gmm: bool) -> torch.Tensor:
    """Row-grouped a [S, K] @ b[e] [K, N] for the rows of each expert group -> [S, N]."""
    if use_gmm:
        return F.grouped_mm(a.contiguous(), b, offs=meta.offs_E)
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for e, n in enumerate(meta.counts_E.tolist()):
        if n:
            torch.mm(a[start : start + n], b[e], out=out[start : start + n])
        start += n
    return out


def group_mm_weight(a_SM: torch.Tensor, b_SN: torch.Tensor, meta: SortMeta, use_gmm: bool) -> torch.Tensor:
    """Per-expert a_e^T @ b_e over each group's rows -> [E, M, N] (zeros for empty groups)."""
    E = meta.counts_E.shape[0]
    if use_gmm:
        out = F.grouped_mm(a_SM.contiguous().t(), b_SN.contiguous(), offs=meta.offs_E)  # [M, S] column-major
        # An empty group's block is left uninitialised by some kernels: zero it explicitly. On the CPU the counts
        # cost nothing to read, so only the empty blocks are written; on CUDA a where() keeps the host out.
        if out.device.type == "cpu":
            return out.index_fill_(0, (meta.counts_E == 0).nonzero().view(-1), 0)
        return torch.where((meta.counts_E > 0)[:, None, None], out, out.new_zeros(()))
    out = a_SM.new_zeros(E, a_SM.shape[1], b_SN.shape[1])
    start = 0
    for e, n in enumerate(meta.counts_E.tolist()):
        if n:
            torch.mm(a_SM[start : start + n].t(), b_SN[start : start + n], out=out[e])
        start += n
    return out


class GroupedLoRAExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling, use_grouped_mm, sort=None):
        E, r, D = lora_A_ERD.shape
        O = lora_B_EOR.shape[1]
        T, K = expert_ids_TK.shape
        dtype = lora_A_ERD.dtype
        meta = sort if sort is not None else SortMeta.build(expert_ids_TK, E)
        use_gmm = resolve_grouped_mm(use_grouped_mm, dtype, D, O, r, x_TD.device)
        x_SD = x_TD.to(dtype).index_select(0, meta.tok_S)
        w_S = weights_TK.reshape(-1).index_select(0, meta.order_S)
        h_Sr = group_mm(x_SD, lora_A_ERD.transpose(1, 2), meta, use_gmm)
        hs_Sr = h_Sr * (scaling * w_S).to(dtype)[:, None]
        u_SO = group_mm(hs_Sr, lora_B_EOR.transpose(1, 2), meta, use_gmm)
        y_TO = u_SO.new_zeros(T, O).index_add_(0, meta.tok_S, u_SO)
        ctx.save_for_backward(
            x_TD, lora_A_ERD, lora_B_EOR, h_Sr, w_S, meta.order_S, meta.tok_S, meta.counts_E, meta.offs_E, meta.inv_S
        )
        ctx.scaling, ctx.use_gmm, ctx.K, ctx.w_dtype = scaling, use_gmm, K, weights_TK.dtype
        return y_TO.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, g_TO):
        x_TD, lora_A_ERD, lora_B_EOR, h_Sr, w_S, order_S, tok_S, counts_E, offs_E, inv_S = ctx.saved_tensors
        meta = SortMeta(order_S=order_S, tok_S=tok_S, counts_E=counts_E, offs_E=offs_E, inv_S=inv_S)
        s, use_gmm, K = ctx.scaling, ctx.use_gmm, ctx.K
        dtype = lora_A_ERD.dtype
        T = x_TD.shape[0]
        g_SO = g_TO.to(dtype).index_select(0, tok_S)
        z_Sr = group_mm(g_SO, lora_B_EOR, meta, use_gmm)
        sw_S = (s * w_S).to(dtype)
        dx = dA = dB = dw = None
        if ctx.needs_input_grad[4]:
            dw_S = s * (z_Sr.float() * h_Sr.float()).sum(-1)
            dw = dw_S.index_select(0, inv_S).to(ctx.w_dtype).view(T, K)
        dh_Sr = z_Sr * sw_S[:, None]
        if ctx.needs_input_grad[0]:
            dx_SD = group_mm(dh_Sr, lora_A_ERD, meta, use_gmm)
            dx = dx_SD.new_zeros(T, x_TD.shape[1]).index_add_(0, tok_S, dx_SD).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            dA = group_mm_weight(dh_Sr, x_TD.to(dtype).index_select(0, tok_S), meta, use_gmm)
        if ctx.needs_input_grad[2]:
            dB = group_mm_weight(g_SO, h_Sr * sw_S[:, None], meta, use_gmm)
        return dx, dA, dB, None, dw, None, None, None


def lora_experts_grouped(
    x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling, use_grouped_mm=None, use_padded=None
):
    """Grouped compute. ``use_grouped_mm``: None takes F.grouped_mm where torch has it and the shapes allow
    (module docstring); True forces it where the shapes allow; False the loop. Without grouped_mm, the padded
    batched GEMMs of kernels/padded.py run while the routing is balanced enough (``use_padded``: None decides
    so, True forces the padded grid even where grouped_mm could run, False never takes it)."""
    E, r, D = lora_A_ERD.shape
    use_gmm = resolve_grouped_mm(use_grouped_mm, lora_A_ERD.dtype, D, lora_B_EOR.shape[1], r, x_TD.device)
    sort = None
    if use_padded or (use_padded is None and not use_gmm):
        sort = SortMeta.build(expert_ids_TK, E)
        capacity = int(sort.counts_E.max()) if expert_ids_TK.numel() else 0  # no device to wait for here
        if use_padded or E * capacity <= PAD_LIMIT * expert_ids_TK.numel():
            return lora_experts_padded(
                x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling, sort, capacity
            )
    return GroupedLoRAExperts.apply(
        x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, float(scaling), use_grouped_mm, sort
    )
