"""Task-conditioned router (MOELoRA, Liu et al., arXiv 2310.18339, Eqs. 5-6; code liuqidong07/MOELoRA-peft).

    e_j = Embedding(task_j)              [d_t]       (one learned vector per task id, d_t = task_embedding_dim)
    w_j = softmax(W_g e_j / temperature) [E]         (W_g [E, d_t], no bias)
    y   = W0 x + sum_e w_{j,e} s B_e A_e x           for every token x of a sample of task j

The weights depend on the task only, not on the token: all experts are used (dense), and for a fixed task the
experts fold into one LoRA, sum_e w_{j,e} B_e A_e, of rank <= E r (``moe_lora.task_routing`` gives w_j per module;
``moe-lora export --format peft --task j`` writes that LoRA). Task ids reach the router per forward through
``moe_lora.set_task_ids(model, ids)`` ([B] per sequence or [B, S] per token; the trainer sets them from the
data's ``task`` field); a forward without them is an error naming the call. Slots: K = E, slot e is expert e.

Reproduced from the code: one task embedding and gate per adapted linear (MMOELoraLinear; the paper's "S"
variant shares one gate over all layers), ``nn.Embedding(task_num + 1, 64)`` (one spare id), a linear gate without
bias, a softmax over experts. Initialisation: embedding N(0, 1) (torch's default, as the code), gate N(0, init_std).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Router, all_expert_ids
from .config import RouterConfig


class TaskRouter(Router):
    name = "task"
    variable_k = True
    #: the model hooks hand ``task_ids`` to routers that set this (see moe_lora.model_hooks.set_task_ids).
    uses_task_ids = True

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None, **options):
        super().__init__(in_features, num_experts, config, **options)  # checks num_tasks, task_embedding_dim
        self.num_tasks, self.task_embedding_dim = self.config.num_tasks, self.config.task_embedding_dim
        # the gate W_g reads the task embedding, not x: [E, d_t] ([E - 1, d_t] for the cluster router)
        self.weight = nn.Parameter(torch.empty(self.num_gated(), self.task_embedding_dim, dtype=torch.float32))
        self.task_embedding = nn.Embedding(self.num_tasks + 1, self.task_embedding_dim, dtype=torch.float32)
        self.task_ids: torch.Tensor | None = None  # set per forward by the model hooks
        self.reset_parameters()

    def num_gated(self) -> int:
        """Rows of the gate W_g: the experts the task's weights spread over."""
        return self.num_experts

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if not hasattr(self, "task_embedding"):
            return  # Router.__init__'s call, before the gate has its shape
        with torch.no_grad():
            self.weight.normal_(0.0, self.config.init_std, generator=generator)
            self.task_embedding.weight.normal_(0.0, 1.0, generator=generator)

    def task_ids_of_tokens(self, T: int, device) -> torch.Tensor:
        """[T] int64 task id of every token row of this forward, from ``self.task_ids``."""
        ids = self.task_ids
        if ids is None:
            raise RuntimeError(
                "router 'task' (MOELoRA) needs the task ids of this forward: call "
                "moe_lora.set_task_ids(model, ids) before it ([B] per sequence or [B, S] per token)"
            )
        ids = ids.to(device=device, dtype=torch.long).reshape(-1)
        if ids.numel() == T:
            return ids
        if ids.numel() > 0 and T % ids.numel() == 0:
            return ids.repeat_interleave(T // ids.numel())
        raise ValueError(f"task_ids: {ids.numel()} ids for {T} tokens; give one per sequence [B] or per token [B, S]")

    def task_logits(self, task_ids_N: torch.Tensor) -> torch.Tensor:
        """[N, E] fp32 logits W_g e_j of the task ids [N]."""
        return self.task_embedding(task_ids_N).float() @ self.weight.float().t()

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.task_logits(self.task_ids_of_tokens(x_TD.shape[0], x_TD.device))

    def task_weights(self, task: int) -> torch.Tensor:
        """[E] fp32 weights w_j of task ``task`` (what every token of that task gets)."""
        logits_1E = self.task_logits(torch.tensor([int(task)], device=self.weight.device))
        return torch.softmax(logits_1E / self.temperature, dim=-1)[0]

    def select(self, probs_TE, x_TD, token_mask_T):
        T, E = probs_TE.shape
        return probs_TE, all_expert_ids(T, E, probs_TE.device), None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_tasks={self.num_tasks}, task_embedding_dim={self.task_embedding_dim}"
