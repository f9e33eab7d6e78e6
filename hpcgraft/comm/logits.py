"""The logits allgather of cultivation: every peer's predictions of the current batch, on every peer.

One Allgather of the rank's peers' batch x classes (small), into buffers kept per batch shape; the
result is in peer order whatever the layout.
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

    def gather(self, logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """(K, B, C) float32 on the logits' device, identical on every peer; ``logits``: this rank's peers'
        (a list, in peer order) or its one peer's."""
        local = [logits] if isinstance(logits, torch.Tensor) else logits
        shape = (len(local), *local[0].shape)
        if shape not in self._buffers:
            self._buffers[shape] = (torch.empty(shape, dtype=torch.float32),
                                    torch.empty((self.comm.Get_size() * shape[0], *shape[1:]), dtype=torch.float32))
        send, recv = self._buffers[shape]
        for row, one in zip(send, local, strict=True):
            row.copy_(one.detach())
        self.comm.Allgather(send.numpy(), recv.numpy())
        return recv.to(local[0].device, non_blocking=True)
