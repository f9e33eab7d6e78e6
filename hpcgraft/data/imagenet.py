"""ImageNet from an image-folder tree ("imagenet") or from HDF5 shards packed from one ("imagenet_h5").

Folder layout (``data.root``): ``train/<class>/*.JPEG|jpg|jpeg|png`` and ``val/<class>/...``. Classes are
the training folder names in sorted order; val must use the same names (it may lack some). Within a class
images are sorted by file name, so image ``i`` is the same picture in the folder and the packed readers.

Packed layout (``data.root`` = the output folder of ``tools/pack_imagenet.py``, written by
:mod:`hpcgraft.data.pack`), one HDF5 file per shard::

    train-00000.h5 ... train-NNNNN.h5, val-00000.h5 ...   shards of each split, images in folder order
    attrs   format="hpcgraft-imagenet", version=1, split ("train"|"val"), mode ("jpeg"|"array"),
            shard, num_shards, start (split index of the shard's first image), count (images in the shard),
            total (images in the split), array_size (array mode only, else 0)
    classes (C,) str        class folder names; label k is classes[k]
    labels  (count,) int64
    names   (count,) str    source path relative to ROOT/<split>, to trace a bad image back
    images  jpeg mode:  (count,) variable-length uint8, the image file's bytes exactly as found in ROOT
            array mode: (count, 3, S, S) uint8, chunks (1, 3, S, S): the image resized so its short side is
                        S (bilinear) and centre-cropped to S x S, S = array_size

Transforms (Pillow, no torchvision): training images get RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3,
bilinear) and a horizontal flip, drawn only from the per-batch generator, so a batch is a pure function of
(indices, generator) in any process. Evaluation resizes the short side to round(S * 256 / 224) and takes
the centre S x S. JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the crop stays at least S pixels
(Pillow's draft mode), which makes low-resolution training much cheaper. Array mode trains on the stored
centre square (the borders outside it are lost); its evaluation batches equal the folder reader's exactly
when S_array = round(S * 256 / 224) and S_array - S is even (256 and 224), else they differ by a resample
or a one-pixel shift of the centre crop.

HDF5 files are opened lazily, once per process, so a reader pickles to DataLoader workers; each process
reads only the images it is asked for.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hpcgraft.data.transforms import normalize
from hpcgraft.errors import DataError

MEAN = torch.tensor((0.485, 0.456, 0.406))
STD = torch.tensor((0.229, 0.224, 0.225))
EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")
FORMAT, VERSION = "hpcgraft-imagenet", 1
MODES = ("jpeg", "array")

_SCALE = (0.08, 1.0)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_ATTEMPTS = 10
_DRAWS = 2 * _ATTEMPTS + 2  # (area, aspect) per attempt, then the crop position
DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # what Pillow raises on broken or truncated files


def resize_size(image_size: int) -> int:
    """Short side before the evaluation centre crop (256 for 224)."""
    return round(image_size * 256 / 224)


# ---------------------------------------------------------------------------------------------- transforms


def _draft(img: Image.Image, max_reduction: float) -> float:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale if that still leaves ``1/max_reduction`` of its size."""
    if max_reduction < 2 or img.format != "JPEG":
        return 1.0
    w, h = img.size
    chosen = img.draft(img.mode, (math.ceil(w / max_reduction), math.ceil(h / max_reduction)))
    return w / chosen[1][2] if chosen else 1.0


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _crop_box(width: int, height: int, u: np.ndarray) -> tuple[int, int, int, int]:
    """RandomResizedCrop's window (x, y, w, h) from ``_DRAWS`` uniforms: a fixed budget per image, so one
    image's size never shifts the randomness of the next."""
    area = width * height
    for t in range(_ATTEMPTS):
        target = area * (_SCALE[0] + (_SCALE[1] - _SCALE[0]) * u[2 * t])
        aspect = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[2 * t + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            break
    else:  # no window fitted: the whole image, clipped to the allowed aspect ratios
        lo, hi = math.exp(_LOG_RATIO[0]), math.exp(_LOG_RATIO[1])
        w, h = width, height
        if width / height < lo:
            h = min(height, round(width / lo))
        elif width / height > hi:
            w = min(width, round(height * hi))
    x = min(int(u[-2] * (width - w + 1)), width - w)
    y = min(int(u[-1] * (height - h + 1)), height - h)
    return x, y, w, h


def random_resized_crop(img: Image.Image, size: int, u: np.ndarray) -> np.ndarray:
    """(size, size, 3) uint8: a random window of ``img`` (drawn from ``u``) scaled to ``size``."""
    x, y, w, h = _crop_box(*img.size, u)
    k = _draft(img, min(w, h) / size)
    img = _rgb(img)
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=(x / k, y / k, (x + w) / k, (y + h) / k)))


def center_view(img: Image.Image, resize: int, crop: int) -> np.ndarray:
    """(crop, crop, 3) uint8: short side scaled to ``resize``, then the centre ``crop`` x ``crop``."""
    width, height = img.size
    _draft(img, min(width, height) / resize)
    img = _rgb(img)
    if width <= height:
        size = (resize, max(resize, round(height * resize / width)))
    else:
        size = (max(resize, round(width * resize / height)), resize)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    return np.asarray(img.resize(size, Image.BILINEAR))[top : top + crop, left : left + crop]


# ---------------------------------------------------------------------------------------------- readers


class _PillowImages:
    """Decoding, augmentation and normalisation shared by the readers; subclasses say where pixels live."""

    def __init__(self, labels: np.ndarray, classes: list[str], image_size: int) -> None:
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.resize = resize_size(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def _fetch(self, idx: np.ndarray) -> list[Any]:
        """The stored form of each image (path, bytes or array), in the order asked."""
        raise NotImplementedError

    def _open(self, item: Any) -> Image.Image:
        raise NotImplementedError

    def _where(self, i: int) -> str:
        raise NotImplementedError

    def _evaluate(self, item: Any) -> np.ndarray:
        return center_view(self._open(item), self.resize, self.image_size)

    def get_batch(self, indices: torch.Tensor, augment: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at ``indices`` as normalised float32 (B, 3, S, S); augmented from ``augment`` when given."""
        idx = indices.numpy().astype(np.int64, copy=False)
        s = self.image_size
        if len(idx) == 0:
            return torch.empty(0, 3, s, s), self.labels[indices]
        u = flip = None
        if augment is not None:  # crop draws, then one flip draw per image (as transforms.random_flip draws)
            u = torch.rand(len(idx), _DRAWS, generator=augment, dtype=torch.float64).numpy()
            flip = (torch.rand(len(idx), generator=augment) < 0.5).numpy()
        out = np.empty((len(idx), 3, s, s), dtype=np.uint8)
        for k, item in enumerate(self._fetch(idx)):
            try:
                hwc = self._evaluate(item) if u is None else random_resized_crop(self._open(item), s, u[k])
            except DECODE_ERRORS as exc:
                raise DataError(f"{self._where(int(idx[k]))}: cannot decode the image ({exc}); "
                                "replace or remove it (and re-pack)") from None
            out[k] = hwc[:, ::-1].transpose(2, 0, 1) if flip is not None and flip[k] else hwc.transpose(2, 0, 1)
        return normalize(torch.from_numpy(out), MEAN, STD), self.labels[indices]


class FolderImages(_PillowImages):
    """One split of an image-folder tree; file paths kept as one bytes array (compact, quick to pickle)."""

    def __init__(self, directory: Path, paths: np.ndarray, labels: np.ndarray, classes: list[str],
                 image_size: int) -> None:
        super().__init__(labels, classes, image_size)
        self.directory = str(directory)
        self.paths = paths

    def _fetch(self, idx: np.ndarray) -> list[Any]:
        return [os.path.join(self.directory, os.fsdecode(self.paths[i])) for i in idx]

    def _open(self, item: Any) -> Image.Image:
        return Image.open(item)

    def _where(self, i: int) -> str:
        return os.path.join(self.directory, os.fsdecode(self.paths[i]))


class H5Images(_PillowImages):
    """One split of packed HDF5 shards; files open lazily per process and only requested images are read."""

    def __init__(self, files: list[Path], starts: np.ndarray, labels: np.ndarray, classes: list[str],
                 mode: str, array_size: int, image_size: int) -> None:
        super().__init__(labels, classes, image_size)
        self.files = [str(f) for f in files]
        self.starts = starts
        self.mode = mode
        self.array_size = array_size
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def _images_of(self, shard: int) -> Any:
        import h5py

        if self._pid != os.getpid():  # a forked worker must not use its parent's HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = h5py.File(self.files[shard], "r", locking=False)
        return f["images"]

    def _locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return shard, i - int(self.starts[shard])

    def _fetch(self, idx: np.ndarray) -> list[Any]:
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        local = idx - self.starts[shard]
        out: list[Any] = [None] * len(idx)
        for s in np.unique(shard):
            pos = np.flatnonzero(shard == s)
            wanted, inverse = np.unique(local[pos], return_inverse=True)  # h5py reads increasing indices
            images = self._images_of(int(s))
            # One read per chunk: h5py's list indexing is fast for vlen bytes, very slow on (n, 3, S, S).
            data = images[wanted] if self.mode == "jpeg" else [images[int(j)] for j in wanted]
            for p, j in zip(pos, inverse, strict=True):
                out[p] = data[j]
        return out

    def _open(self, item: Any) -> Image.Image:
        if self.mode == "jpeg":
            return Image.open(io.BytesIO(item.tobytes()))
        return Image.fromarray(np.ascontiguousarray(item.transpose(1, 2, 0)))

    def _evaluate(self, item: Any) -> np.ndarray:
        if self.mode == "array" and self.array_size == self.resize:  # stored as the eval view: crop only
            o = (self.resize - self.image_size) // 2
            return item[:, o : o + self.image_size, o : o + self.image_size].transpose(1, 2, 0)
        return super()._evaluate(item)

    def _where(self, i: int) -> str:
        shard, local = self._locate(i)
        return f"{self.files[shard]} image {local}"


# ---------------------------------------------------------------------------------------------- folders


@dataclass
class Listing:
    """The images of one split of a folder tree, in reader order."""

    directory: Path
    paths: np.ndarray  # bytes, relative to directory
    labels: np.ndarray  # int64


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _list_split(root: Path, split: str, classes: list[str] | None) -> tuple[list[str], Listing]:
    directory = root / split
    if not directory.is_dir():
        raise DataError(f"{directory} is missing: ImageNet needs {root}/train/<class>/ and {root}/val/<class>/ "
                        "image folders (sort the flat validation images into class folders first)")
    found = _subdirs(directory)
    if not found:
        raise DataError(f"{directory} holds no class folders; expected {directory}/<class>/*.JPEG")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{directory}/{unknown[0]} is not a class of {root}/train ({len(unknown)} such); "
                            "val must use the training class folder names")
    label_of = {c: k for k, c in enumerate(classes)}
    paths: list[bytes] = []
    labels: list[int] = []
    for cls in found:
        names = sorted(e.name for e in os.scandir(directory / cls)
                       if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(EXTENSIONS))
        if not names:
            raise DataError(f"{directory / cls} holds no .JPEG/.jpg/.png images; add them or remove the folder")
        paths.extend(os.fsencode(os.path.join(cls, n)) for n in names)
        labels.extend([label_of[cls]] * len(names))
    return classes, Listing(directory, np.array(paths, dtype=bytes), np.array(labels, dtype=np.int64))


def list_folder(root: str | os.PathLike) -> tuple[list[str], dict[str, Listing]]:
    """Classes and the train/val listings of an image-folder tree; a bad tree raises :class:`DataError`."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root={root} does not exist; point it at the ImageNet folder holding train/ and val/")
    classes, train = _list_split(base, "train", None)
    _, val = _list_split(base, "val", classes)
    return classes, {"train": train, "val": val}


# ---------------------------------------------------------------------------------------------- HDF5 shards


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.h5"


def _read_split(out_dir: Path, split: str) -> tuple[list[Path], np.ndarray, np.ndarray, list[str], str, int]:
    import h5py

    hint = f"re-run tools/pack_imagenet.py IMAGENET_ROOT {out_dir}"
    files = sorted(out_dir.glob(f"{split}-*.h5"))
    if not files:
        raise DataError(f"data.root={out_dir} holds no {split}-*.h5 shards; {hint}")
    starts, labels, meta = [], [], None
    for k, path in enumerate(files):
        try:
            with h5py.File(path, "r", locking=False) as f:
                a = f.attrs
                if a.get("format") != FORMAT or a.get("version") != VERSION:
                    raise DataError(f"{path} is not a {FORMAT} v{VERSION} shard; {hint}")
                this = (list(f["classes"].asstr()[()]), str(a["mode"]), int(a["array_size"]), int(a["num_shards"]))
                lab = f["labels"][()]
                if int(a["shard"]) != k or len(lab) != int(a["count"]) or len(f["images"]) != len(lab):
                    raise DataError(f"{path}: shard {int(a['shard'])} of {this[3]} is inconsistent with the "
                                    f"{len(files)} files found (or truncated); {hint}")
                starts.append(int(a["start"]))
        except (OSError, KeyError) as exc:
            raise DataError(f"{path} is not a readable {FORMAT} shard ({exc}); {hint}") from None
        if meta is not None and this != meta:
            raise DataError(f"{path} was packed with other classes/mode/array size than {files[0]}; {hint}")
        meta = this
        labels.append(lab)
    classes, mode, array_size, num_shards = meta
    total = sum(len(x) for x in labels)
    if num_shards != len(files) or starts != np.cumsum([0] + [len(x) for x in labels])[:-1].tolist():
        raise DataError(f"{out_dir}: {len(files)} {split} shards found but {num_shards} were written; {hint}")
    if total == 0:
        raise DataError(f"{out_dir}: the {split} shards hold no images; {hint}")
    return files, np.array(starts, dtype=np.int64), np.concatenate(labels).astype(np.int64), classes, mode, array_size


def _load_h5(root: Path, image_size: int) -> tuple[H5Images, H5Images]:
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist; pack ImageNet with tools/pack_imagenet.py "
                        f"IMAGENET_ROOT {root}")
    sets = []
    for split in SPLITS:
        files, starts, labels, classes, mode, array_size = _read_split(root, split)
        if mode == "array" and array_size < image_size:
            raise DataError(f"{root} was packed at --array-size {array_size}, smaller than data.image_size="
                            f"{image_size}; re-pack with --array-size {resize_size(image_size)}")
        sets.append(H5Images(files, starts, labels, classes, mode, array_size, image_size))
    if (sets[0].classes, sets[0].mode) != (sets[1].classes, sets[1].mode):
        raise DataError(f"{root}: train and val shards come from different packs; re-run tools/pack_imagenet.py")
    return sets[0], sets[1]


def load_imagenet(name: str, root: str | None, image_size: int) -> tuple[_PillowImages, _PillowImages]:
    """(train, val) of ``imagenet`` (folder tree) or ``imagenet_h5`` (packed shards) at ``image_size``."""
    if root is None:
        what = "the folder holding train/ and val/" if name == "imagenet" else "the output of tools/pack_imagenet.py"
        raise DataError(f"data.name={name} needs data.root: {what}")
    if image_size < 1:
        raise DataError(f"data.image_size={image_size} must be a positive number of pixels (224 is standard)")
    if name == "imagenet_h5":
        return _load_h5(Path(root).expanduser(), image_size)
    base = Path(root).expanduser()
    if not (base / "train").is_dir() and any(base.glob(f"{SPLITS[0]}-*.h5")):
        # Packed shards under the folder-tree name would fail on the missing train/ folder instead.
        raise DataError(f"data.root={root} holds hpcgraft shards ({SPLITS[0]}-*.h5): add data.name=imagenet_h5")
    classes, listings = list_folder(root)
    train, val = (FolderImages(listings[s].directory, listings[s].paths, listings[s].labels, classes, image_size)
                  for s in SPLITS)
    return train, val
