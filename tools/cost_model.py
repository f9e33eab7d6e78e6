#!/usr/bin/env python
"""The cost of one graft round with K = 8..1024 peers on real interconnects: ring, allreduce, hierarchical ring.

Prints the table of docs/performance.md ("Scaling the number of peers"), so that its numbers can be
reproduced and recomputed for another network (``--net NAME=ALPHA_US,BETA_GBPS``) or another measurement
of this node's shared-memory path (``--comm bench_comm.json``, from tools/bench_comm.py).

The round's messages, as hpcgraft sends them (hpcgraft/comm/exchange.py), for a model of M bytes of
grafted tensors and E entropies per peer (one per layer, or one per filter at ``graft.level=filter``):

  entropies   every rank receives every peer's E entropies (float64), K * E * 8 bytes: an allgather over
              R ranks, ceil(log2 R) latencies; a node's NIC carries what its n ranks receive from the
              other nodes. Both topologies do this today.
  ring        peers are placed in contiguous blocks, so only a block's edge crosses a rank and only a
              node's edge crosses the network: one message of M per node and round (alpha + M / beta),
              whatever K is; P - 1 neighbours per rank are local copies.
  allreduce   the entropy-weighted sum of all K models: the P peers of a rank summed locally, then an
              allreduce of M over the ranks. Tree/Rabenseifner (what MPI libraries and NCCL use for large
              messages, node-aware): 2 ceil(log2 N) alpha + 2 (N-1)/N M / beta over N nodes; the ring
              algorithm over all R ranks: 2 (R-1) alpha + 2 (R-1)/R M / beta.
  hier ring   peers on one node graft locally (an allreduce in shared memory), nodes form a ring (one
              message of M per node) and exchange entropies with their ring neighbour only.
  ring/nbr    today's ring with the entropies sent along with the weights to the neighbour only (and an
              allgather of K one-byte finiteness flags): what the ring costs without the allgather.

Local work that does not depend on K (the entropies of a peer's own layers, the mixing; measured by
tools/bench_graft.py) is left out: it is the same for every topology and K, P times per rank.

    .venv/bin/python tools/cost_model.py [--peers-per-rank 1] [--ranks-per-node 8] [--comm bench_comm.json]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

KS = (8, 32, 128, 512, 1024)
MODELS = {"resnet20": 10, "resnet32": 10, "resnet56": 10, "resnet50": 1000}  # name -> classes


@dataclass(frozen=True)
class Link:
    alpha: float  # s per message
    beta: float  # bytes per s

    def t(self, nbytes: float, messages: float = 1.0) -> float:
        return messages * self.alpha + nbytes / self.beta


# Published figures: link rate for beta (what MPI's large messages reach, a little under it), small-message
# MPI latency for alpha. Sources in docs/performance.md ("Scaling the number of peers").
NETWORKS = {
    "IB-HDR": Link(1.0e-6, 24e9),  # InfiniBand HDR, 200 Gb/s (ConnectX-6)
    "IB-NDR": Link(1.0e-6, 48e9),  # InfiniBand NDR, 400 Gb/s (ConnectX-7)
    "Slingshot": Link(2.0e-6, 24e9),  # HPE Slingshot-11, 200 Gb/s endpoints
    "100GbE": Link(3.0e-6, 12e9),  # 100 Gb Ethernet with RDMA (RoCE v2)
    "25GbE": Link(30e-6, 3e9),  # 25 Gb Ethernet through the kernel's TCP stack
}
# This node's shared-memory path (tools/bench_comm.py on the 2-core development machine): the intra-node
# messages and the local copies. Replaced by --comm.
SHM = Link(2.6e-6, 12.6e9)  # the Sendrecv fit: alpha 2.6 us, beta 12.6 GB/s
COPY = 30e9  # bytes/s of a local copy: memcpy of the largest message (8 MiB)


def model_figures(name: str) -> tuple[int, int, int]:
    """M (bytes the round moves per peer), E at layer level, E at filter level, from hpcgraft's own plan."""
    import torch

    from hpcgraft.method import grafting
    from hpcgraft.models import create_model

    state = create_model(name, MODELS[name]).state_dict()
    plan = grafting.plan_layers(state)
    keys = grafting.member_keys(plan)
    nbytes = sum(state[k].numel() * state[k].element_size() for k in keys)
    filters = sum(g.filters if g.per_filter else 1 for g in plan)
    del torch
    return nbytes, len(plan), filters


def round_times(m: int, e: int, k: int, p: int, n: int, net: Link, shm: Link, copy: float) -> dict[str, float]:
    """Seconds of one round's communication and copies, per topology."""
    r = max(1, k // p)
    nodes = max(1, math.ceil(r / n))
    per_node = min(n, r)
    remote = (nodes - 1) / nodes
    link = net if nodes > 1 else shm
    log_r, log_nodes, log_n = (math.ceil(math.log2(x)) if x > 1 else 0 for x in (r, nodes, per_node))
    h = k * e * 8
    entropies = (log_r * link.alpha + per_node * h * remote / net.beta + h / shm.beta) if r > 1 else h / copy
    local_ring = (p - 1) * m / copy
    # every rank pair sends at once: the round waits for the slower of a node-internal and a network message
    ring_x = max(shm.t(m) if per_node > 1 else 0.0, net.t(m) if nodes > 1 else 0.0)
    local_sum = p * m / copy
    tree = (2 * log_nodes * net.alpha + 2 * remote * m / net.beta if nodes > 1 else 0.0) + (
        2 * log_n * shm.alpha + 2 * (per_node - 1) / per_node * m / shm.beta if per_node > 1 else 0.0)
    worst = Link(max(net.alpha, shm.alpha), min(net.beta, shm.beta)) if nodes > 1 else shm  # a ring's slowest link
    ring_alg = 2 * (r - 1) * worst.alpha + 2 * (r - 1) / r * m / worst.beta if r > 1 else 0.0
    flags = log_r * link.alpha + k / link.beta if r > 1 else 0.0
    node_local = (2 * log_n * shm.alpha + 2 * (per_node - 1) / per_node * m / shm.beta if per_node > 1 else 0.0)
    return {
        "ring": entropies + ring_x + local_ring,
        "ring/nbr": flags + ring_x + e * 8 / link.beta + local_ring,
        "allreduce tree": entropies + local_sum + tree,
        "allreduce ring": entropies + local_sum + ring_alg,
        "hier ring": local_sum + node_local + (net.t(m + e * 8) if nodes > 1 else 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-per-rank", type=int, default=1, help="P (default 1: one GPU per peer)")
    parser.add_argument("--ranks-per-node", type=int, default=8, help="n (default 8: eight GPUs per node)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"of {', '.join(NETWORKS)}")
    parser.add_argument("--net", action="append", default=[], metavar="NAME=ALPHA_US,BETA_GBPS",
                        help="another network, e.g. mine=5,10")
    parser.add_argument("--comm", type=Path, help="tools/bench_comm.py --json output: this node's shared memory")
    args = parser.parse_args()
    shm, copy = SHM, COPY
    if args.comm:
        fit = json.loads(args.comm.read_text())["fit"]
        shm = Link(fit["sendrecv"]["alpha_s"], fit["sendrecv"]["beta_Bps"])
        largest = json.loads(args.comm.read_text())["rows"][-1]
        copy = largest["bytes"] / largest["memcpy"]
    networks = {k: NETWORKS[k] for k in args.networks.split(",") if k}
    for spec in args.net:
        name, _, values = spec.partition("=")
        alpha_us, beta_gbps = (float(v) for v in values.split(","))
        networks[name] = Link(alpha_us * 1e-6, beta_gbps * 1e9)
    p, n = args.peers_per_rank, args.ranks_per_node
    print(f"graft round, communication and copies only (ms); P = {p} peers per rank, n = {n} ranks per node; "
          f"shared memory alpha {shm.alpha * 1e6:.1f} us, beta {shm.beta / 1e9:.1f} GB/s, copies {copy / 1e9:.1f} GB/s")
    topologies = ("ring", "ring/nbr", "allreduce tree", "allreduce ring", "hier ring")
    header = f"{'network':<10} {'model':<9} {'level':<6} {'MB':>6} {'E':>6} {'K':>5} | " + " ".join(
        f"{t:>14}" for t in topologies)
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        m, e_layer, e_filter = model_figures(name)
        for net_name, net in networks.items():
            for level, e in (("layer", e_layer), ("filter", e_filter)):
                for k in KS:
                    if k < p:
                        continue
                    t = round_times(m, e, k, p, n, net, shm, copy)
                    print(f"{net_name:<10} {name:<9} {level:<6} {m / 1e6:>6.1f} {e:>6} {k:>5} | "
                          + " ".join(f"{1e3 * t[x]:>14.2f}" for x in topologies))


if __name__ == "__main__":
    main()
