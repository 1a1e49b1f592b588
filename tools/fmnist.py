"""Fashion-MNIST reader: gzipped IDX files into numpy, normalisation, and the task splits (5+5, 4+3+3, ...).

No torchvision: the IDX format is simple enough to read by hand (big-endian header, then raw uint8).
"""
import gzip
import os

import numpy as np

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN = 0.2860
STD = 0.3530
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}


def _read_idx(path):
    """Read one gzipped IDX file into a numpy array of its stored shape (uint8 only, as Fashion-MNIST uses)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} bytes")
    return array.reshape(shape)


def load_split(split, data_dir=DATA_DIR):
    """Return (images uint8 (N,28,28), labels int64 (N,)) for split 'train' or 'test'."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"Fashion-MNIST folder {data_dir} is missing; install it with "
            f"`apt-get install -y dataset-fashion-mnist` (or pass data_dir)")
    paths = {kind: os.path.join(data_dir, _FILES[(split, kind)]) for kind in ("images", "labels")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing; reinstall with `apt-get install -y dataset-fashion-mnist`")
    images = _read_idx(paths["images"])
    labels = _read_idx(paths["labels"]).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def normalize(images):
    """uint8 (N,28,28) -> float32 (N,1,28,28), (x/255 - MEAN)/STD."""
    x = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def load(split, data_dir=DATA_DIR):
    """Normalised images float32 (N,1,28,28) and labels int64 (N,) of 'train' or 'test'."""
    images, labels = load_split(split, data_dir)
    return normalize(images), labels


def task_split(seed, sizes=(5, 5)):
    """Disjoint tasks: a RandomState(seed) permutation of the 10 classes cut in order into runs of `sizes`.

    The default (5, 5) is the pairs' split (first 5 to a, last 5 to b); (4, 3, 3) gives three tasks (first 4 to
    a, next 3 to b, last 3 to c). Returns one list of class ids per task, each in head order: head output k of a
    task's model predicts class tasks[i][k]. The permutation does not depend on `sizes`, so splits of one seed
    cut the same class order.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1 or sum(sizes) != len(CLASS_NAMES):
        raise ValueError(f"task sizes {sizes}: need two or more positive sizes that sum to {len(CLASS_NAMES)}")
    perm = np.random.RandomState(seed).permutation(len(CLASS_NAMES))
    bounds = np.cumsum([0] + sizes)
    return tuple([int(c) for c in perm[lo:hi]] for lo, hi in zip(bounds[:-1], bounds[1:]))


def task_subset(x, y, classes):
    """Images of the given classes, labels remapped to 0..len(classes)-1 in the order of `classes`."""
    classes = list(classes)
    mask = np.isin(y, classes)
    remap = np.full(10, -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    return x[mask], remap[y[mask]]
