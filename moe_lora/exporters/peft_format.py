"""Fixed routing -> a standard PEFT LoRA adapter (peft_type LORA, PEFT's key names), exact or SVD-truncated.

Under fixed weights w [E] (the same for every token: a task's routing vector, a one-hot expert, or E = 1) an
MoE-LoRA linear adds s * sum_e w_e B_e A_e x, one LoRA of rank n*r (n = experts with w_e != 0):

    A = [A_e1; A_e2; ...]                 [n*r, in]     (the A_e stacked)
    B = [s w_e1 B_e1, s w_e2 B_e2, ...]   [out, n*r]    (the B_e scaled by s * w_e)

written with lora_alpha = r_out, so PEFT's scaling alpha / r is 1. Every module gets the same rank r_out (the
largest n*r unless --rank is given; smaller ones are zero-padded, which adds nothing), as multi-LoRA servers
want one rank per adapter. With --rank below a module's n*r the delta BA is truncated to its best rank-r_out
approximation (SVD, Eckart-Young) and the relative Frobenius error ||BA - (BA)_r|| / ||BA|| of every such module
is reported; an export with any truncation is labelled approximate.

Block routers (router_scope: block) route every projection of the block with the block's weights: each
projection gets its own LoRA as above. FFN experts (MixLoRA) combine non-linearly,
y = (1 - sum w) FFN(x) + sum w_e E_e(x), which is one FFN with LoRA only for a one-hot (or all-zero) w: other
routings are refused (use --format mixtral to keep the routing).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapter_io import base_path
from ..block import ExpertLinear, MoEBlock
from ..layer import MoELoRALinear
from ..routers import ExpertChoiceRouter
from ..routing import iter_routed_modules
from . import access

PEFT_PREFIX = "base_model.model."


def default_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Fixed weights [1] for every routed module when all have one expert whose router always gives weight 1;
    None otherwise (a routing must then be given)."""
    out = {}
    for name, m in iter_routed_modules(model):
        router = access.router_of(m)
        if router.num_experts != 1:
            return None
        if isinstance(router, ExpertChoiceRouter) and router.config.capacity_factor < 1:
            return None  # capacity ceil(c T) < T leaves some tokens without their expert
        out[name] = torch.ones(1)
    return out or None


def is_one_hot_or_zero(w_E: torch.Tensor) -> bool:
    nz = torch.nonzero(w_E).flatten().tolist()
    return not nz or (len(nz) == 1 and float(w_E[nz[0]]) == 1.0)


def fixed_routing_problems(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """FFN-expert blocks whose fixed weights are not one-hot (or zero): not one FFN (one problem naming them)."""
    bad = [
        (name, weights[name])
        for name, m in iter_routed_modules(model)
        if isinstance(m, MoEBlock) and m.ffn_experts and not is_one_hot_or_zero(weights[name])
    ]
    if not bad:
        return []
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return [
        f"routing: FFN-expert blocks {', '.join(repr(n) for n, _ in bad[:3])}{more} get weights "
        f"{[round(float(x), 4) for x in bad[0][1]]}; MixLoRA experts combine non-linearly, so only a one-hot "
        f"(or all-zero) routing is a single FFN with one LoRA per projection"
    ]


def module_loras(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Yield (base path, module, A [n*r, in], B [out, n*r]) of every expert module under the fixed weights (fp32,
    the experts with zero weight left out; n = 0 gives empty factors)."""
    block_of = {id(e): n for n, b in iter_routed_modules(model) if isinstance(b, MoEBlock) for e in b.experts()}
    for name, m in model.named_modules():
        if isinstance(m, MoELoRALinear):
            w = weights[name]
        elif isinstance(m, ExpertLinear):
            w = weights[block_of[id(m)]]
        else:
            continue
        A, B, s = access.lora_A_ERI(m).float(), access.lora_B_EOR(m).float(), access.lora_scaling(m)
        keep = [e for e in range(len(w)) if float(w[e]) != 0.0]
        A_NI = A[keep].reshape(-1, A.shape[-1]).cpu()
        B_ON = torch.cat([s * float(w[e]) * B[e] for e in keep], dim=1).cpu() if keep else B.new_zeros(B.shape[1], 0)
        yield base_path(name), m, A_NI, B_ON


def truncate(A_NI: torch.Tensor, B_ON: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [rank, in], B [out, rank], relative Frobenius error) of the best rank-``rank`` approximation of B A
    (fp64): QR of both factors, SVD of the small core, B = Q_B U sqrt(S), A = sqrt(S) V^T Q_A^T."""
    N = A_NI.shape[0]
    if rank >= N:
        pad = rank - N
        return (
            torch.cat([A_NI, A_NI.new_zeros(pad, A_NI.shape[1])]),
            torch.cat([B_ON, B_ON.new_zeros(B_ON.shape[0], pad)], dim=1),
            0.0,
        )
    qa, ra = torch.linalg.qr(A_NI.double().t())  # A^T = qa ra
    qb, rb = torch.linalg.qr(B_ON.double())  # B = qb rb
    U, S, Vh = torch.linalg.svd(rb @ ra.t())  # B A = qb (rb ra^T) qa^T
    root = S[:rank].sqrt()
    B_new = (qb @ U[:, :rank]) * root
    A_new = root[:, None] * (Vh[:rank] @ qa.t())
    total = float(S.pow(2).sum())
    err = math.sqrt(float(S[rank:].pow(2).sum()) / total) if total > 0 else 0.0
    return A_new.float(), B_new.float(), err


def peft_adapter(model: nn.Module, weights: dict[str, torch.Tensor], rank: int | None):
    """(tensors {PEFT key: tensor}, adapter_config dict, {module: relative error} of truncated modules)."""
    loras = list(module_loras(model, weights))
    needed = max(A.shape[0] for _, _, A, _ in loras)
    r_out = max(1, needed) if rank is None else rank
    tensors, errors, conv1d = {}, {}, False
    for path, m, A, B in loras:
        A_r, B_r, err = truncate(A, B, r_out)
        if A.shape[0] > r_out:
            errors[path] = err
        dtype = access.lora_A_ERI(m).dtype
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A_r.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B_r.to(dtype).contiguous()
        conv1d = conv1d or not isinstance(m.base_layer, nn.Linear)
    cls = type(model).__name__
    task = "CAUSAL_LM" if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel") else None
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": getattr(model.config, "name_or_path", None) or None,
        "r": r_out,
        "lora_alpha": r_out,
        "target_modules": [path for path, _, _, _ in loras],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return tensors, config, errors
