"""RouterConfig: every setting a router reads, validated in one place and handed to the router whole.

    RouterConfig(name="topk", top_k=2, temperature=1.0, jitter_noise=0.0, init_std=0.02,
                 threshold_max=None, capacity_factor=2.0, num_tasks=None, task_embedding_dim=64,
                 classifier_hidden_size=None, bias_update_rate=0.0)

``num_tasks`` and ``task_embedding_dim``: the task- and cluster-conditioned routers (MOELoRA, MoCLE);
``classifier_hidden_size``: X-LoRA's (the model's hidden size); ``top_k`` of 'xlora' keeps the k largest scalings.

``top_k`` is the number of experts a token keeps: exactly k for the top-k and contrastive routers; for the soft
router the k largest probabilities are kept and renormalised (None: all E); the threshold and expert-choice
routers choose the count themselves and ignore it. ``bias_update_rate`` is the rate u of auxiliary-loss-free
balancing (moe_lora/balancing.py), used by the top-k and contrastive routers (0: no selection bias).
``MoELoRAConfig.router_config`` builds one from a
MoELoRAConfig (its ``router_temperature``, ``router_init_std`` and, for the soft router, ``soft_top_k``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import is_int, is_number
from ..errors import ConfigError

#: Routers that choose how many experts a token gets (the top_k of MoELoRAConfig is not used by them).
VARIABLE_K_ROUTERS = ("soft", "threshold", "expert_choice", "task", "mole", "xlora")
#: Routers whose top_k must be an int in [1, E] (the cluster router's in [1, E - 1]: its last expert is universal).
FIXED_K_ROUTERS = ("topk", "contrastive", "cluster")
#: Routers that read task or cluster ids (moe_lora.set_task_ids).
TASK_ROUTERS = ("task", "cluster")


def k_problem(router: str, top_k, num_experts, where: str = "", subject: str | None = None) -> str | None:
    """The rule k <= E, the one place it is written: a message when a fixed-k router's ``top_k`` exceeds
    ``num_experts`` (``where`` names the module, ``subject`` replaces 'top_k: k'), else None. Types are checked
    by the callers."""
    if router in VARIABLE_K_ROUTERS or not (is_int(top_k) and is_int(num_experts)) or top_k <= num_experts:
        return None
    return f"{subject or f'top_k: {top_k}'} is larger than num_experts={num_experts}{where} (k <= E)"


@dataclass(frozen=True)
class RouterConfig:
    name: str = "topk"
    top_k: int | None = 2
    temperature: float = 1.0
    jitter_noise: float = 0.0
    init_std: float = 0.02
    threshold_max: float | None = None
    capacity_factor: float = 2.0
    num_tasks: int | None = None
    task_embedding_dim: int = 64
    classifier_hidden_size: int | None = None
    bias_update_rate: float = 0.0

    def problems(self, num_experts: int) -> list[str]:
        """Every invalid setting for a router over ``num_experts`` experts, naming the field and the value (the
        name is checked where the class is looked up: ``moe_lora.routers.router_class``)."""
        p = []
        if self.name in FIXED_K_ROUTERS or (self.name in ("soft", "xlora") and self.top_k is not None):
            if not (is_int(self.top_k) and self.top_k >= 1):
                p.append(f"top_k: {self.top_k!r} must be an int >= 1")
            elif self.name in ("soft", "xlora") and self.top_k > num_experts:
                p.append(
                    f"top_k: {self.top_k} is larger than num_experts={num_experts} (the soft router keeps "
                    "the k largest)"
                )
            elif (problem := k_problem(self.name, self.top_k, num_experts)) is not None:
                p.append(problem)
            elif self.name == "cluster" and self.top_k > num_experts - 1:
                p.append(
                    f"top_k: {self.top_k} must be at most num_experts - 1 = {num_experts - 1} for router "
                    "'cluster' (the last expert is the universal one)"
                )
        if not (is_number(self.temperature) and self.temperature > 0):
            p.append(f"temperature: {self.temperature!r} must be a number > 0")
        if not (is_number(self.jitter_noise) and 0.0 <= self.jitter_noise < 1.0):
            p.append(f"jitter_noise: {self.jitter_noise!r} must be in [0, 1)")
        if not (is_number(self.init_std) and self.init_std >= 0):
            p.append(f"init_std: {self.init_std!r} must be a number >= 0")
        if self.threshold_max is not None and not (is_number(self.threshold_max) and 0 < self.threshold_max <= 1):
            p.append(f"threshold_max: {self.threshold_max!r} must be null or in (0, 1]")
        if not (is_number(self.capacity_factor) and self.capacity_factor > 0):
            p.append(f"capacity_factor: {self.capacity_factor!r} must be a number > 0")
        if self.name in TASK_ROUTERS and not (is_int(self.num_tasks) and self.num_tasks >= 1):
            p.append(f"num_tasks: {self.num_tasks!r} must be an int >= 1 with router {self.name!r}")
        if self.name == "cluster" and is_int(num_experts) and num_experts < 2:
            p.append(
                f"num_experts: {num_experts} must be >= 2 for router 'cluster' (cluster experts and the "
                "universal expert, the last)"
            )
        if not (is_int(self.task_embedding_dim) and self.task_embedding_dim >= 1):
            p.append(f"task_embedding_dim: {self.task_embedding_dim!r} must be an int >= 1")
        if self.name == "xlora" and not (is_int(self.classifier_hidden_size) and self.classifier_hidden_size >= 1):
            p.append(
                f"classifier_hidden_size: {self.classifier_hidden_size!r} must be the model's hidden size "
                "(an int >= 1) with router 'xlora'"
            )
        if not (is_number(self.bias_update_rate) and self.bias_update_rate >= 0):
            p.append(f"bias_update_rate: {self.bias_update_rate!r} must be a number >= 0")
        return p

    def check(self, num_experts: int) -> RouterConfig:
        """This config, or a ConfigError listing every problem."""
        problems = self.problems(num_experts)
        if problems:
            raise ConfigError(problems, f"{self.name} router")
        return self


#: MoELoRAConfig's names of the router settings (the names MoELoRALinear's keywords take too).
ROUTER_SETTINGS = (
    "router_temperature",
    "jitter_noise",
    "router_init_std",
    "soft_top_k",
    "threshold_max",
    "capacity_factor",
    "num_tasks",
    "task_embedding_dim",
    "classifier_hidden_size",
    "bias_update_rate",
)


def router_config_from_settings(
    router: str,
    top_k,
    router_temperature=1.0,
    jitter_noise=0.0,
    router_init_std=0.02,
    soft_top_k=None,
    threshold_max=None,
    capacity_factor=2.0,
    num_tasks=None,
    task_embedding_dim=64,
    classifier_hidden_size=None,
    bias_update_rate=0.0,
) -> RouterConfig:
    """The RouterConfig of MoELoRAConfig's router settings: the one place their names are translated
    (router_temperature -> temperature, router_init_std -> init_std; the k a token keeps: ``top_k`` for the
    top-k and contrastive routers, ``soft_top_k`` for the soft router, none for the others)."""
    k = top_k if router in FIXED_K_ROUTERS else soft_top_k if router in ("soft", "xlora") else None
    return RouterConfig(
        name=router,
        top_k=k,
        temperature=router_temperature,
        jitter_noise=jitter_noise,
        init_std=router_init_std,
        threshold_max=threshold_max,
        capacity_factor=capacity_factor,
        num_tasks=num_tasks,
        task_embedding_dim=task_embedding_dim,
        classifier_hidden_size=classifier_hidden_size,
        bias_update_rate=bias_update_rate,
    )
