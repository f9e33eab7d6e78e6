"""The logits allgather of cultivation: every peer's predictions of the current batch, on every peer.

One Allgather of the rank's peers x batch x classes (small), into buffers kept per batch shape; ranks
host contiguous blocks of peers, so the result is in peer order on any layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mpi4py import MPI


class PeerLogits:
    """Allgathers the peers' logits of the current batch over the graft communicator."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self._buffers: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """(K, B, C) float32 on ``logits``' device; identical on every peer. ``logits``: this rank's peers'
        (P, B, C), or one peer's (B, C)."""
        if logits.dim() == 2:
            logits = logits.unsqueeze(0)
        shape = tuple(logits.shape)
        if shape not in self._buffers:
            self._buffers[shape] = (torch.empty(shape, dtype=torch.float32),
                                    torch.empty((self.comm.Get_size() * shape[0], *shape[1:]), dtype=torch.float32))
        send, recv = self._buffers[shape]
        send.copy_(logits.detach())
        self.comm.Allgather(send.numpy(), recv.numpy())
        return recv.to(logits.device, non_blocking=True)
