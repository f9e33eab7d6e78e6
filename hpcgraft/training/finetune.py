"""Pruning a trained run's peers, fine-tuning them and measuring top-1: the prune command's work.

Every (criterion, keep) pair is one job per peer: mask (:mod:`hpcgraft.method.pruning`), fine-tune N epochs
with the run's config (its schedule restarted over N epochs, no grafting, no cultivation, no monitor)
re-applying the mask after every optimizer step, evaluate. Every mask is computed before any fine-tuning, so
bad input ends the command with one line and exit status 2 before any work, agreed on every rank. Under
mpirun rank r takes peers r, r+K, ... and rank 0 gathers the results into ``OUT/prune.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hpcgraft.config import Config
from hpcgraft.errors import EXIT_OK, SetupError, UserError, report
from hpcgraft.method import lean
from hpcgraft.method.pruning import RESULTS_FILE, Mask, check_request, make_mask
from hpcgraft.storage.atomic import write_text
from hpcgraft.storage.outputs import check_output_dir, check_output_file
from hpcgraft.storage.run import load_model, peer_states, read_config
from hpcgraft.training.evaluation import predict

PROG = "hpcgraft.prune"
# Fine-tuning trains a pruned peer alone: no graft (it would mix in unpruned weights), no distillation.
FINETUNE = ("graft.mode=none", "cultivate.lambda=0", "prune.monitor=off", "checkpoint.enabled=false")


@dataclasses.dataclass
class PruneRequest:
    """The prune command's request as given: lists still as the comma-separated text, checked by
    :func:`prepare` on every rank."""

    path: str
    criterion: str
    keep: str
    out: Path
    finetune_epochs: int = 0
    peer: int | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)  # config overrides for fine-tuning
    image_size: int = lean.DEFAULT_IMAGE_SIZE
    keep_redundant: bool = False


def parse_list(text: str, kind: type, name: str) -> list[Any]:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{name} {text!r} is not a comma-separated list of {kind.__name__}s") from None


def peer_index(label: str) -> int:
    return int(re.match(r"peer (\d+)", label).group(1))  # type: ignore[union-attr]


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((probs.argmax(1) == labels).float().mean())


def job_dir(out: Path, criterion: str, keep: float) -> Path:
    return out / f"{criterion}-keep{keep:g}"


def finetune(cfg: Config, peer_no: int, peers: int, state: dict[str, torch.Tensor], mask: Mask) -> Any:
    """Train the masked peer with the training loop itself; the mask is re-applied after every step."""
    from hpcgraft.comm import mpi
    from hpcgraft.comm.failure import StopRequest
    from hpcgraft.comm.world import init_world
    from hpcgraft.training.loop import train_one_epoch
    from hpcgraft.training.peer import build_peer

    world = dataclasses.replace(init_world(1, mpi().COMM_SELF), peer=peer_no, peers=peers)
    peer = build_peer(cfg, world)
    peer.model.load_state_dict(state)
    mask.apply(peer.model)
    peer.after_step.append(mask.apply)
    stop = StopRequest(world.comm)
    try:
        while peer.progress.epoch < cfg.train.epochs:
            peer.progress.start_epoch()
            train_one_epoch(peer, stop)
            peer.progress.epoch += 1
    finally:
        stop.close()
    return peer


def run_jobs(cfg: Config, jobs: list[tuple[str, float, int]], states: dict[int, dict[str, torch.Tensor]],
             masks: dict[tuple[str, float, int], Mask], epochs: int, out: Path) -> dict[tuple[str, float, int], Any]:
    """This rank's jobs: prune, fine-tune, save, evaluate. -> job -> (top1 pruned, top1, probs, labels)."""
    from hpcgraft.data import BatchLoader, build_datasets

    _, test_set = build_datasets(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.reference)
    loader = BatchLoader(test_set, cfg.data.test_batch_size, shuffle=False)
    device = torch.device("cpu")
    results = {}
    for criterion, keep, p in jobs:
        mask = masks[(criterion, keep, p)]
        model = load_model(cfg, states[p], f"peer {p}")
        mask.apply(model)
        before = top1(*predict(model, loader, device))
        if epochs > 0:
            peer = finetune(cfg, p, len(states), states[p], mask)
            model, device = peer.model, peer.device
        probs, labels = predict(model, loader, device)
        d = job_dir(out, criterion, keep)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / f"peer-{p:03d}.pt")
        torch.save(mask.state_dict(), d / f"peer-{p:03d}.mask.pt")
        zero = all(bool((prm.detach()[~mask.masks[n].to(prm.device)] == 0).all())
                   for n, prm in model.named_parameters() if n in mask.masks)
        results[(criterion, keep, p)] = (before, top1(probs, labels), probs, labels, zero)
    return results


def unpruned_top1(cfg: Config, states: dict[int, dict[str, torch.Tensor]]) -> dict[int, float]:
    from hpcgraft.data import BatchLoader, build_datasets

    _, test_set = build_datasets(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.reference)
    loader = BatchLoader(test_set, cfg.data.test_batch_size, shuffle=False)
    return {p: top1(*predict(load_model(cfg, s, f"peer {p}"), loader, torch.device("cpu"))) for p, s in states.items()}


def format_table(doc: dict[str, Any]) -> str:
    peers = sorted(doc["unpruned"], key=int)
    cols = ["criterion", "keep", "kept", "kernels chosen>left (peer mean)", *[f"peer {p}" for p in peers], "ensemble"]
    rows = [["unpruned", "1", "", "", *[f"{doc['unpruned'][p]:.2f}" for p in peers], ""]]
    for r in doc["results"]:
        k = r["kernels"]
        chosen, left = (statistics.fmean(k[key].values()) for key in ("kept_by_criterion", "kept"))
        rows.append([r["criterion"], f"{r['keep']:g}", f"{r['kept']}/{r['total']} {r['unit']}",
                     f"{chosen:.0f}>{left:.0f}/{k['total']}",
                     *[f"{r['top1'][p]:.2f}" for p in peers], f"{r['ensemble']:.2f}"])
    widths = [max(len(row[i]) for row in [cols, *rows]) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [cols, *rows]]
    ft = doc["finetune_epochs"]
    return f"top-1 (%) after pruning{f' and {ft} fine-tune epoch(s)' if ft else ''}:\n" + "\n".join(lines)


def prepare(args: PruneRequest) -> tuple[Config, str, dict[int, dict[str, torch.Tensor]], list, dict]:
    """Everything decided before any work: the request, the run, its config and every mask."""
    criteria = parse_list(args.criterion, str, "criterion")
    keeps = parse_list(args.keep, float, "keep")
    if not criteria or not keeps:
        raise UserError("--criterion and --keep each need at least one value")
    for c in criteria:
        for k in keeps:
            check_request(c, k)
    if args.finetune_epochs < 0:
        raise UserError(f"--finetune-epochs {args.finetune_epochs} must be >= 0")
    check_output_file(check_output_dir(args.out, "--out") / RESULTS_FILE, "--out")
    for c in criteria:
        for k in keeps:
            check_output_dir(job_dir(args.out, c, k), "--out")
    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint; give the run directory the training wrote")
    trained = read_config(path)
    if trained is None:
        raise UserError(f"{path} holds weights only; prune reads the run they came from: give its run directory, "
                        "a checkpoint or a peer .h5 file")
    overrides = [*FINETUNE, f"train.epochs={max(1, args.finetune_epochs)}", *args.overrides]
    cfg = read_config(path, overrides).cfg
    arm = "baseline" if trained.cfg.graft.mode == "none" else "grafted"
    labelled = peer_states(path, peer=args.peer)
    states = {peer_index(label): s for label, s in labelled.items()}
    masks = {}
    for (label, s), p in zip(labelled.items(), states, strict=True):
        model = load_model(cfg, s, f"{path} ({label})")
        for c in criteria:
            for k in keeps:
                masks[(c, k, p)] = make_mask(model, c, k, args.image_size, args.keep_redundant)
    jobs = [(c, k, p) for c in criteria for k in keeps for p in states]
    return cfg, arm, states, jobs, masks


def prune_run(args: PruneRequest) -> int:
    """Prune, fine-tune and measure every (criterion, keep, peer) of ``args``, the jobs shared among the
    ranks when started by mpirun; rank 0 writes prune.json and prints the table. Returns the exit status."""
    comm = None
    # MPI for fine-tuning, and whenever started by mpirun (the ranks then share the jobs, not the files).
    launched = int(os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1) > 1
    if args.finetune_epochs > 0 or launched:
        from hpcgraft.comm import mpi
        from hpcgraft.comm.world import agreed

        comm = mpi().COMM_WORLD
    try:
        cfg, arm, states, jobs, masks = agreed(comm, lambda: prepare(args)) if comm is not None else prepare(args)
    except (UserError, SetupError) as exc:
        return report(PROG, exc)
    torch.set_num_threads(cfg.dist.threads or torch.get_num_threads())
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    started = time.perf_counter()
    mine = [j for j in jobs if j[2] % size == rank]
    results = run_jobs(cfg, mine, states, masks, args.finetune_epochs, args.out)
    gathered = comm.gather(results, root=0) if comm is not None else [results]
    if rank != 0:
        return EXIT_OK
    allres = {k: v for part in gathered for k, v in part.items()}
    doc = results_doc(args, cfg, arm, states, jobs, masks, allres)
    doc["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / RESULTS_FILE, json.dumps(doc, indent=1) + "\n")
    print(format_table(doc), flush=True)
    return EXIT_OK


def results_doc(args: PruneRequest, cfg: Config, arm: str, states: dict[int, dict[str, torch.Tensor]], jobs: list,
                masks: dict[tuple[str, float, int], Mask], allres: dict[tuple[str, float, int], Any]) -> dict[str, Any]:
    """prune.json: the request, the unpruned top-1 and per (criterion, keep) what was kept and measured."""
    doc: dict[str, Any] = {"source": str(args.path), "model": cfg.model.name, "data": cfg.data.name,
                           "arm": arm,
                           "finetune_epochs": args.finetune_epochs, "overrides": list(args.overrides),
                           "redundant_removed": not args.keep_redundant,
                           "unpruned": {str(p): v for p, v in unpruned_top1(cfg, states).items()}, "results": []}
    seen = []
    for c, k, _ in jobs:
        if (c, k) in seen:
            continue
        seen.append((c, k))
        peers = sorted(p for (c2, k2, p) in allres if (c2, k2) == (c, k))
        m = masks[(c, k, peers[0])]
        probs = torch.stack([allres[(c, k, p)][2] for p in peers]).mean(0)
        doc["results"].append({
            "criterion": c, "keep": k, "unit": m.unit, "kept": m.kept, "total": m.total,
            "kept_fraction": m.kept / m.total, "dir": str(job_dir(args.out, c, k)),
            "kernels": {"total": m.kernels_total,
                        "kept_by_criterion": {str(p): masks[(c, k, p)].kernels_by_criterion for p in peers},
                        "kept": {str(p): masks[(c, k, p)].kernels for p in peers}},
            "top1_pruned": {str(p): allres[(c, k, p)][0] for p in peers},
            "top1": {str(p): allres[(c, k, p)][1] for p in peers},
            "pruned_zero": all(allres[(c, k, p)][4] for p in peers),
            "ensemble": top1(probs, allres[(c, k, peers[0])][3]),
        })
    return doc
