"""The logits allgather of cultivation: every peer's predictions of the current batch, on every peer.

One Allgather of batch x classes per peer (small), into buffers kept per batch shape.
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
        """(K, B, C) float32 on ``logits``' device; identical on every peer."""
        shape = tuple(logits.shape)
        if shape not in self._buffers:
            self._buffers[shape] = (torch.empty(shape, dtype=torch.float32),
                                    torch.empty((self.comm.Get_size(), *shape), dtype=torch.float32))
        send, recv = self._buffers[shape]
        send.copy_(logits.detach())
        self.comm.Allgather(send.numpy(), recv.numpy())
        return recv.to(logits.device, non_blocking=True)
