"""Cluster-conditional router with a universal expert (MoCLE, Gou et al., arXiv 2312.12379).

Instructions are clustered offline (k-means over instruction embeddings of the training data:
moe_lora/clusters.py, ``moe-lora cluster``); every token of a sample carries its sample's cluster id j, like a
task id (``moe_lora.set_task_ids``; the trainer reads it from ``data.task_field``). Of the E experts of a module,
the last is the universal expert u, the others are the cluster-conditioned ones:

    e_j = Embedding(j)                              [d_c]       (one learned vector per cluster)
    p   = softmax(W_g e_j / temperature)            [E - 1]     (W_g [E - 1, d_c], no bias)
    S   = the k largest p;  w_i = p_i / sum_{S} p   for i in S  (the cluster picks its experts)
    y   = W0 x + sum_{i in S} w_i s B_i A_i x + s B_u A_u x      (the universal expert: every token, weight 1)

Slots: K = k + 1, the last slot is the universal expert (its probability column is 0). As for MOELoRA's task
router the routing depends on the cluster only, so each cluster folds into one LoRA (``moe_lora.task_routing``).

Unverified against the paper's text (only its abstract was available when this was written): the gate's exact
form, k (1 by default here) and how the universal expert's output is weighted (1 here, added to the routed mix).
"""

from __future__ import annotations

import torch

from .config import RouterConfig
from .task import TaskRouter


class ClusterRouter(TaskRouter):
    name = "cluster"
    variable_k = False

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None, **options):
        if config is None:
            options.setdefault("top_k", 1)
        super().__init__(in_features, num_experts, config, **options)  # checks 1 <= top_k <= E - 1
        self.k = self.config.top_k
        self.reset_parameters()

    def num_gated(self) -> int:
        return self.num_experts - 1

    @property
    def top_k(self) -> int:
        return self.k + 1

    @property
    def k_per_token(self) -> int | None:
        return self.k + 1

    def task_logits(self, task_ids_N: torch.Tensor) -> torch.Tensor:
        """[N, E] logits of the cluster ids: W_g e_j for the cluster experts, -inf for the universal one."""
        logits = super().task_logits(task_ids_N)
        return torch.cat([logits, logits.new_full((logits.shape[0], 1), float("-inf"))], dim=1)

    def select(self, probs_TE, x_TD, token_mask_T):
        T, E = probs_TE.shape
        top_p_TK, ids_TK = torch.topk(probs_TE[:, : E - 1], self.k, dim=-1)
        weights_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True)
        universal_T1 = torch.full((T, 1), E - 1, dtype=ids_TK.dtype, device=ids_TK.device)
        return (
            torch.cat([weights_TK, torch.ones_like(weights_TK[:, :1])], 1),
            torch.cat([ids_TK, universal_T1], 1),
            None,
        )

    def task_weights(self, task: int) -> torch.Tensor:
        """[E] weights of cluster ``task``: the renormalised top-k of the cluster experts and 1 for the universal."""
        probs_1E = torch.softmax(
            self.task_logits(torch.tensor([int(task)], device=self.weight.device)) / self.temperature, dim=-1
        )
        w_1K, ids_1K, _ = self.select(probs_1E, probs_1E, None)
        return torch.zeros(self.num_experts, device=w_1K.device).index_add_(0, ids_1K[0], w_1K[0])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.k} + universal expert {self.num_experts - 1}"
