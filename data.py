"""Data sets as uint8 tensors resident on the training device, and batches made there.

load() reads a data set once (torchvision downloads and parses CIFAR-10/100 and SVHN; Tiny ImageNet is read from
its official zip layout and decoded once into a cached uint8 array), splits a fixed-seed validation set off the
training set, and puts everything on the device. batches() shuffles, augments (per-sample random crop with zero
padding + horizontal flip, done in batch on the device) and converts to float in [0, 1] there: no DataLoader,
no host-device copies in the training loop.
"""
import math
import os
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

DATASETS = ("cifar10", "cifar100", "svhn", "tiny_imagenet", "synthetic")
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
SOURCES = {  # what a user must put in --data-dir when it cannot be downloaded
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "svhn": "http://ufldl.stanford.edu/housenumbers/{train,test}_32x32.mat",
    "tiny_imagenet": TINY_URL,
}


def _missing(name, root, err):
    return SystemExit(f"error: {name} not found in {root}/ and it could not be downloaded ({err}); "
                      f"put {SOURCES[name]} in {root}/ or pass --data-dir to where it is")


def _torchvision(name, root, download):
    import torchvision.datasets as tvd
    make = {"cifar10": lambda tr, d: tvd.CIFAR10(root, train=tr, download=d),
            "cifar100": lambda tr, d: tvd.CIFAR100(root, train=tr, download=d),
            "svhn": lambda tr, d: tvd.SVHN(root, split="train" if tr else "test", download=d)}[name]
    out = []
    for train in (True, False):
        try:
            ds = make(train, False)
        except RuntimeError as e:  # not there, or its checksum does not match
            if not download:
                raise _missing(name, root, "download disabled") from e
            try:
                ds = make(train, True)
            except Exception as e2:
                raise _missing(name, root, f"{type(e2).__name__}: {str(e2).splitlines()[0][:120]}") from e2
        if name == "svhn":
            x, y = torch.from_numpy(ds.data), torch.as_tensor(ds.labels)  # already N,C,H,W
        else:
            x, y = torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.as_tensor(ds.targets)
        out += [x.contiguous(), y.long()]
    return out


def _tiny_imagenet(root, download):
    """Official layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt.
    The labelled val split serves as the test set (the official test split has no labels)."""
    from PIL import Image
    base = os.path.join(root, "tiny-imagenet-200")
    cache = os.path.join(base, "uint8_cache.npz")
    if not os.path.exists(cache):
        if not os.path.isdir(base):
            archive = os.path.join(root, "tiny-imagenet-200.zip")
            if not os.path.exists(archive):
                if not download:
                    raise _missing("tiny_imagenet", root, "download disabled")
                from torchvision.datasets.utils import download_url
                try:
                    download_url(TINY_URL, root, md5=TINY_MD5)
                except Exception as e:
                    raise _missing("tiny_imagenet", root, f"{type(e).__name__}") from e
            try:
                with zipfile.ZipFile(archive) as z:
                    z.extractall(root)
            except zipfile.BadZipFile as e:
                raise SystemExit(f"error: {archive} is not a valid zip file; delete it and download it again") from e
        try:
            with open(os.path.join(base, "wnids.txt")) as f:
                wnids = sorted(w.strip() for w in f if w.strip())
            label = {w: i for i, w in enumerate(wnids)}
            read = lambda p: np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8)
            train = [(os.path.join(base, "train", w, "images", f), label[w])
                     for w in wnids for f in sorted(os.listdir(os.path.join(base, "train", w, "images")))]
            with open(os.path.join(base, "val", "val_annotations.txt")) as f:
                val = [(os.path.join(base, "val", "images", parts[0]), label[parts[1]])
                       for parts in (line.split("\t") for line in f) if len(parts) > 1]
        except (OSError, KeyError) as e:
            raise SystemExit(f"error: {base} does not have the Tiny ImageNet layout ({e}); "
                             f"delete it and unzip tiny-imagenet-200.zip again") from e
        arrays = {}
        for split, items in (("train", train), ("test", val)):
            arrays[split + "_x"] = np.stack([read(p) for p, _ in items]).transpose(0, 3, 1, 2)
            arrays[split + "_y"] = np.array([c for _, c in items], dtype=np.int64)
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)  # atomic: a killed decode leaves no half cache behind
    with np.load(cache, allow_pickle=False) as z:
        return [torch.from_numpy(np.ascontiguousarray(z[k])) for k in ("train_x", "train_y", "test_x", "test_y")]


def _synthetic(n_train=50000, n_test=10000, classes=10, size=32, seed=0):
    """CIFAR-shaped learnable stand-in, for benchmarks and tests: each class is a smooth colour pattern (4x4 random
    values upsampled, so most energy sits at low frequencies as in natural images), each image 3/4 its class's
    pattern and 1/4 uniform noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=size, mode="bilinear")
    templates = (templates * 191).to(torch.uint8)  # 3/4 of the range
    out = []
    for n in (n_train, n_test):
        y = torch.randint(0, classes, (n,), generator=g)
        noise = torch.randint(0, 64, (n, 3, size, size), generator=g, dtype=torch.uint8)  # 1/4 of the range
        out += [templates[y] + noise, y]
    return out


def load(name, root="data", val_size=1000, device="cpu", download=True):
    """Returns a dict of uint8 N,C,H,W images and int64 labels on `device`:
    train_x/train_y, val_x/val_y (a fixed-seed split of the training set), test_x/test_y,
    and num_classes, pad (crop padding) and flip (whether horizontal flips are label-preserving)."""
    if name not in DATASETS:
        raise SystemExit(f"error: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    # several processes: rank 0 downloads / decodes first, the others then read what it wrote
    shared = dist.is_initialized() and name != "synthetic"
    if shared and dist.get_rank() != 0:
        dist.barrier()
    if name == "tiny_imagenet":
        tx, ty, sx, sy = _tiny_imagenet(root, download)
    elif name == "synthetic":
        tx, ty, sx, sy = _synthetic()
    else:
        tx, ty, sx, sy = _torchvision(name, root, download)
    if shared and dist.get_rank() == 0:
        dist.barrier()
    if not 0 <= val_size < len(tx):
        raise SystemExit(f"error: --val-size {val_size} must be in [0, {len(tx)}) for {name}")
    # The validation split does not depend on the run's seed: every run and method validates on the same images.
    perm = torch.randperm(len(tx), generator=torch.Generator().manual_seed(0))
    val_idx, train_idx = perm[:val_size], perm[val_size:].sort().values
    num_classes = {"cifar100": 100, "tiny_imagenet": 200}.get(name, 10)
    d = dict(train_x=tx[train_idx], train_y=ty[train_idx], val_x=tx[val_idx], val_y=ty[val_idx],
             test_x=sx, test_y=sy)
    d = {k: v.to(device) for k, v in d.items()}
    d.update(num_classes=num_classes, pad=4 if tx.shape[-1] <= 32 else 8, flip=name != "svhn")
    return d


def crop_flip(x, pad, oy, ox, flip):
    """Per-sample crop of x (B,C,H,W) zero-padded by `pad`: sample i is padded[i, :, oy_i:oy_i+H, ox_i:ox_i+W],
    then mirrored left-right where flip_i. Offsets are in [0, 2*pad]."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # B,H,1
    cols = ox[:, None] + torch.arange(W, device=x.device)  # B,W
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # B,1,W
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded[b, :, rows, cols].permute(0, 3, 1, 2)  # advanced indices first: B,H,W,C -> B,C,H,W


def random_crop_flip(x, pad, flip=True, generator=None):
    B, kw = x.shape[0], dict(device=x.device, generator=generator)
    oy = torch.randint(0, 2 * pad + 1, (B,), **kw)
    ox = torch.randint(0, 2 * pad + 1, (B,), **kw)
    f = torch.rand(B, **kw) < 0.5 if flip else torch.zeros(B, dtype=torch.bool, device=x.device)
    return crop_flip(x, pad, oy, ox, f)


def batches(x, y, batch_size, shuffle=False, augment=False, pad=4, flip=True, seed=None, rank=0, world=1,
            max_batches=None, memory_format=torch.contiguous_format):
    """Yields (float images in [0,1], labels), all on x's device. With world > 1 every global batch of
    `batch_size` is split across ranks and rank `rank` gets its part: the permutation and the augmentation are
    drawn for the global batch from `seed`, so the data equal those of a single-process run."""
    n = len(x)
    # with a seed, order and augmentation come from a generator of their own: they do not depend on how much
    # randomness the training step draws (PGD starts), so they are the same for any number of processes
    g = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
    idx = torch.randperm(n, device=x.device, generator=g) if shuffle else torch.arange(n, device=x.device)
    nb = math.ceil(n / batch_size)
    if max_batches is not None:
        nb = min(nb, max_batches)
    for i in range(nb):
        j = idx[i * batch_size:(i + 1) * batch_size]
        xb, yb = x[j], y[j]
        if augment:  # drawn for the whole global batch, identical on every rank and to a single-process run
            xb = random_crop_flip(xb, pad, flip, g)
        if world > 1:
            xb, yb = xb.tensor_split(world)[rank], yb.tensor_split(world)[rank]
        yield xb.float().div_(255).contiguous(memory_format=memory_format), yb


def num_batches(n, batch_size, max_batches=None):
    nb = math.ceil(n / batch_size)
    return nb if max_batches is None else min(nb, max_batches)

