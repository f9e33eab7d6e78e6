"""Top-1 and top-5 of a run's peers and of their ensemble, offline (no MPI).

    python -m hpcgraft.evaluate RUN_OR_CHECKPOINT_OR_PT [--peer I] [--best] [--data NAME --data-root DIR]
                                [--config YAML] [--json PATH] [key=value ...]

The scoring is :mod:`hpcgraft.training.evaluation`'s, the same as training's ``test_acc`` and
``ensemble_acc`` (the arg-max of the peers' mean softmax).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpcgraft.cli import add_overrides
from hpcgraft.config import load_config
from hpcgraft.data import BatchLoader, build_datasets
from hpcgraft.errors import EXIT_USAGE, ConfigError, InputError, UserError, report
from hpcgraft.storage.atomic import write_text
from hpcgraft.storage.outputs import check_output_file
from hpcgraft.storage.run import load_model, peer_states, read_config, with_overrides
from hpcgraft.training.evaluation import evaluate_models
from hpcgraft.training.peer import select_device


def evaluate(path: Path, *, peer: int | None = None, best: bool = False, config: str | None = None,
             overrides: list[str] = (), device: str = "auto") -> dict:
    """Evaluate what ``path`` holds on the run's test set (or the one the overrides name); the JSON record."""
    if not path.exists():
        raise InputError(f"{path} does not exist; give a run directory, a checkpoint, a peer .h5 file or a .pt file")
    states = peer_states(path, peer=peer, use_best=best)
    if config is not None:
        cfg = load_config(config, overrides)
    else:
        trained = read_config(path)
        if trained is None:
            raise ConfigError(f"{path} holds weights only; pass --config with the YAML it was trained with (a "
                              "configs/*.yaml or the run's config.yaml) to build its model")
        cfg = with_overrides(trained.cfg, list(overrides))
    _, test_set = build_datasets(cfg.data.name, cfg.data.root, cfg.data.image_size, cfg.data.reference)
    dev = select_device(device, 0)
    num_classes = cfg.model.num_classes or test_set.num_classes
    models = {label: load_model(cfg, state, f"{path} ({label})", num_classes=num_classes, device=dev)
              for label, state in states.items()}
    loader = BatchLoader(test_set, cfg.data.test_batch_size, shuffle=False)
    result = evaluate_models(models, loader, dev)
    return {"source": str(path), "data": cfg.data.name, "data_root": cfg.data.root, "model": cfg.model.name,
            **result.to_dict(), "table": result.table()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcgraft.evaluate",
                                description="Top-1 and top-5 accuracy of a run's peers and of their ensemble "
                                "(mean softmax), on the run's test set or another data set. No MPI.")
    p.add_argument("path", type=Path, help="a run directory (its newest checkpoint), a checkpoint directory, a "
                   "peer .h5 file, or a .pt state dict (needs --config)")
    p.add_argument("--peer", type=int, help="evaluate only this peer")
    p.add_argument("--best", action="store_true", help="each peer's best checkpoint instead of the newest")
    p.add_argument("--config", help="YAML config that builds the model (needed for a .pt file)")
    p.add_argument("--data", help="evaluate on this data set (data.name) instead of the run's")
    p.add_argument("--data-root", help="its folder (data.root)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    add_overrides(p, "config overrides, e.g. data.test_batch_size=512")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    overrides += [f"data.name={args.data}"] if args.data else []
    overrides += [f"data.root={args.data_root}"] if args.data_root else []
    try:
        if args.peer is not None and args.peer < 0:
            raise ConfigError(f"--peer {args.peer} is negative; peers are numbered from 0")
        if args.json:
            check_output_file(args.json, "--json")
        record = evaluate(args.path, peer=args.peer, best=args.best, config=args.config, overrides=overrides,
                          device=args.device)
    except UserError as exc:
        return report("hpcgraft", exc, EXIT_USAGE)
    table = record.pop("table")
    print(f"{record['source']}: {record['model']} on the {record['data']} test set "
          f"({record['images']} images, {record['classes']} classes)")
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)  # checked at start: nothing but folders in the way
        write_text(args.json, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
