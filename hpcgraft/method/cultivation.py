"""Cultivation (the extension paper): mutual distillation between peers on the same batch.

Each step every peer adds lambda * T^2 * KL(q_others || q_self), where q = softmax(logits / T) and
q_others is the mean of the other peers' softened predictions. Peers must draw identical batches while
cultivation is on; the logits travel between them in :mod:`hpcgraft.comm.logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(target || softmax(logits / T)), averaged over the batch."""
    log_q = F.log_softmax(logits / temperature, dim=1)
    return temperature**2 * F.kl_div(log_q, target_probs, reduction="batchmean")


def mean_of_others(all_logits: torch.Tensor, own: int, temperature: float) -> torch.Tensor | None:
    """Mean softened prediction of every peer but ``own``; ``all_logits`` is (K, B, C).

    A peer whose logits are not finite is left out, as grafting leaves out its weights: one NaN target
    would make every peer NaN within a step. None when no other peer is finite (no distillation then)."""
    finite = torch.isfinite(all_logits.reshape(all_logits.shape[0], -1)).all(dim=1).tolist()
    keep = [k for k in range(all_logits.shape[0]) if k != own and finite[k]]
    if not keep:
        return None
    probs = F.softmax(all_logits[keep].float() / temperature, dim=2)
    return probs.mean(dim=0)
