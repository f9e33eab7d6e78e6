#!/usr/bin/env python
"""Pack an ImageNet folder tree into HDF5 shards for data.name=imagenet_h5.

Millions of small files are slow on cluster file systems; a few hundred large shards are not. The layout
(also in hpcgraft/data/imagenet.py):

  OUT_DIR/train-00000.h5 ... and OUT_DIR/val-00000.h5 ..., images in the folder reader's order
  attrs   format="hpcgraft-imagenet", version=1, split, mode, shard, num_shards, start, count, total,
          array_size (array mode; 0 in jpeg mode)
  classes (C,) str; labels (count,) int64; names (count,) str (path relative to ROOT/<split>)
  images  jpeg:  (count,) variable-length uint8, the original file bytes (decoded while training)
          array: (count, 3, S, S) uint8, one chunk per image: short side resized to S, centre S x S crop

jpeg mode keeps full resolution and the whole image for augmentation (about the size of the tree);
array mode skips decoding while training (fast), at 3*S*S bytes an image and only the centre square.
Use --array-size round(image_size * 256 / 224) (256 for 224) so evaluation needs no resampling.
"""

from __future__ import annotations

import argparse
import sys
import time

from hpcgraft.data.pack import pack_imagenet
from hpcgraft.errors import DataError


class Progress:
    """One status line: rewritten in place on a terminal, a line every 10 s in a log file."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def __call__(self, split: str, done: int, total: int, nbytes: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        line = (f"{split}: {done}/{total} images, {nbytes / 2**20:.1f} MiB, "
                f"{done / max(now - self.t0, 1e-9):.0f} img/s")
        end = "\n" if done == total or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
        if done == total:
            self.t0 = now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", metavar="ROOT", help="ImageNet folder holding train/<class>/ and val/<class>/")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created; must hold no shards yet)")
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard file (default 10000)")
    parser.add_argument("--mode", choices=["jpeg", "array"], default="jpeg",
                        help="jpeg: original bytes; array: decoded uint8 arrays (default jpeg)")
    parser.add_argument("--array-size", type=int, default=256, help="side S of array mode images (default 256)")
    parser.add_argument("--jobs", type=int, default=1, help="processes reading/decoding images (default 1)")
    args = parser.parse_args(argv)
    try:
        s = pack_imagenet(args.root, args.out_dir, mode=args.mode, shard_size=args.shard_size,
                          array_size=args.array_size, jobs=args.jobs, progress=Progress())
    except DataError as exc:
        print(f"pack_imagenet: {exc}", file=sys.stderr)
        return 2
    print(f"packed {s.images} images ({args.mode} mode) into {args.out_dir}: {s.bytes / 2**20:.1f} MiB "
          f"({s.bytes} bytes) in {s.seconds:.1f} s, {s.images / max(s.seconds, 1e-9):.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
