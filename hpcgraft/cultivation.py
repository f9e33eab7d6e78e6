"""Cultivation (the extension paper): mutual distillation between peers on the same batch.

Each step every peer adds lambda * T^2 * KL(q_others || q_self), where q = softmax(logits / T) and
q_others is the mean of the other peers' softened predictions. The logits travel with one Allgather
(batch x classes per peer: small). Peers must draw identical batches while cultivation is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mpi4py import MPI


def distillation_loss(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(target || softmax(logits / T)), averaged over the batch."""
    log_q = F.log_softmax(logits / temperature, dim=1)
    return temperature**2 * F.kl_div(log_q, target_probs, reduction="batchmean")


def mean_of_others(all_logits: torch.Tensor, own: int, temperature: float) -> torch.Tensor:
    """Mean softened prediction of every peer but ``own``; ``all_logits`` is (K, B, C)."""
    probs = F.softmax(all_logits.float() / temperature, dim=2)
    keep = [k for k in range(all_logits.shape[0]) if k != own]
    return probs[keep].mean(dim=0)


class PeerLogits:
    """Allgathers the peers' logits of the current batch over the graft communicator."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self._buffers: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """(K, B, C) float32 on ``logits``' device; identical on every peer."""
        shape = tuple(logits.shape)
        if shape not in self._buffers:
            self._buffers[shape] = (torch.empty(shape, dtype=torch.float32),
                                    torch.empty((self.comm.Get_size(), *shape), dtype=torch.float32))
        send, recv = self._buffers[shape]
        send.copy_(logits.detach())
        self.comm.Allgather(send.numpy(), recv.numpy())
        return recv.to(logits.device, non_blocking=True)
