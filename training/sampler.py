"""A deterministic distributed sampler whose position is the optimizer step (resuming = knowing the step).

Global batch G = micro_batch_size * grad_accum * world_size items. The item stream is the concatenation of
per-epoch permutations ``randperm(N, seed * 1_000_003 + epoch)``, each truncated to a multiple of G (the last
partial batch of an epoch is dropped), so step s reads positions [s*G, (s+1)*G) of it:

    epoch = s // steps_per_epoch,  j = s % steps_per_epoch,  global batch = perm_epoch[j*G : (j+1)*G]

and micro-batch m of rank r is the slice [(m * world + r) * B : (m * world + r + 1) * B] of the global batch
(B = micro_batch_size). One rank with B' = world * B reads the same global batch as ``world`` ranks with B.
"""

from __future__ import annotations

import torch


class StepSampler:
    def __init__(self, num_items: int, micro_batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int):
        self.num_items, self.micro_batch_size, self.grad_accum = num_items, micro_batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.global_batch = micro_batch_size * grad_accum * world_size
        if num_items < self.global_batch:
            raise ValueError(
                f"data: {num_items} training sequences are fewer than one global batch of {self.global_batch} "
                f"(train.micro_batch_size={micro_batch_size} * train.grad_accum={grad_accum} * world size "
                f"{world_size}); add data, shorten data.seq_len or lower the batch size"
            )
        self.steps_per_epoch = num_items // self.global_batch
        self._epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_items, generator=gen).tolist()
            self._epoch = epoch
        return self._perm

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_indices(self, step: int) -> list[int]:
        """The G item indices of optimizer step ``step`` (0-based), over all ranks and micro-batches."""
        j = step % self.steps_per_epoch
        perm = self._permutation(self.epoch_of(step))
        return perm[j * self.global_batch : (j + 1) * self.global_batch]

    def indices(self, step: int, micro: int) -> list[int]:
        """This rank's items of micro-batch ``micro`` of step ``step``."""
        g = self.global_indices(step)
        lo = (micro * self.world_size + self.rank) * self.micro_batch_size
        return g[lo : lo + self.micro_batch_size]
