"""Data: the data sets as uint8 tensors on the training device, batches made there, extra images, IDBH, torchrun.

load() reads a data set once (CIFAR-10/100 and SVHN through torchvision, MNIST and Fashion-MNIST from their IDX files,
Tiny ImageNet from its zip layout into a uint8 cache), splits off a fixed-seed validation set and puts it all on the
device. batches() shuffles, augments (random crop with zero or reflect padding, a flip where it keeps the label,
rotation; or IDBH) and converts to [0, 1] there, for the global batch of every process: no DataLoader, no host-device
copies. Crop padding 2 / 4 / 8 for 28 / 32 / 64-px images; no flip for SVHN and MNIST. Grey images stay 1-channel.
"""
import datetime
import functools
import gzip
import math
import os
import pickle
import shutil
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import InputError

DATASETS = ("cifar10", "cifar100", "svhn", "tiny_imagenet", "mnist", "fashion_mnist", "synthetic")
NUM_CLASSES = {"cifar100": 100, "tiny_imagenet": 200}  # 10 for the others
CHANNELS = {"mnist": 1, "fashion_mnist": 1}  # 3 for the others
# The full training sets, before the validation split: --recipe wang2023 counts its EMA warm-up in their batches, as
# the release does (CIFAR 50,000, SVHN 73,257, Tiny ImageNet 100,000)
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "tiny_imagenet": 100_000, "mnist": 60_000,
                "fashion_mnist": 60_000, "synthetic": 50_000}
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
SOURCES = {  # what a user must put in --data-dir when it cannot be downloaded
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "svhn": "http://ufldl.stanford.edu/housenumbers/{train,test}_32x32.mat",
    "tiny_imagenet": TINY_URL,
    "mnist": "the four MNIST IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)",
    "fashion_mnist": "the four Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist puts them in /usr/share/"
                     "datasets/fashion-mnist)",
}
SYSTEM_DIRS = {"fashion_mnist": ["/usr/share/datasets/fashion-mnist"]}  # Debian's dataset-fashion-mnist package
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The first ten training labels of the official files: MNIST and Fashion-MNIST use the same file names, so this is how
# a folder of one is told from the other (a run must not train on Fashion-MNIST under the name mnist).
FIRST_LABELS = {"mnist": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], "fashion_mnist": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]}


def load(name, root="data", val_size=1000, device="cpu", pad_mode="zero", rotate=0.0, augment="crop-flip",
         download=True):
    """A dict of uint8 N,C,H,W images and int64 labels on `device`: train_x/y, val_x/y (a fixed-seed split of the
    training set), test_x/y, num_classes, channels, and `augment`, the settings for batches(): crop padding, its mode
    (zero or reflect), flip (whether flips keep the label), rotate (max degrees) and idbh (a variant, or None)."""
    # several processes: rank 0 downloads / decodes first, the others then read what it wrote
    shared = dist.is_initialized() and name != "synthetic"
    if shared and dist.get_rank() != 0:
        dist.barrier()
    read = {"tiny_imagenet": _tiny_imagenet, "synthetic": lambda root, download: _synthetic(),
            "mnist": functools.partial(_idx_dataset, "mnist"),
            "fashion_mnist": functools.partial(_idx_dataset, "fashion_mnist")}
    tx, ty, sx, sy = read.get(name, functools.partial(_torchvision, name))(root, download)
    if shared and dist.get_rank() == 0:
        dist.barrier()
    if not 0 <= val_size < len(tx):
        raise InputError(f"--val-size {val_size} must be in [0, {len(tx)}) for {name}")
    perm = torch.randperm(len(tx), generator=torch.Generator().manual_seed(0))
    val_idx, train_idx = perm[:val_size], perm[val_size:].sort().values  # seed 0: every run validates on the same
    d = dict(train_x=tx[train_idx], train_y=ty[train_idx], val_x=tx[val_idx], val_y=ty[val_idx], test_x=sx, test_y=sy)
    d = {k: v.to(device) for k, v in d.items()}
    size = tx.shape[-1]
    d["augment"] = dict(pad=2 if size <= 28 else 4 if size <= 32 else 8, pad_mode=pad_mode, rotate=rotate,
                        flip=name not in ("svhn", "mnist"), idbh=None if augment == "crop-flip" else augment)
    d["num_classes"], d["channels"] = classes_and_channels(name)
    return d


def classes_and_channels(name):
    """The number of classes and the image channels of data set `name`, known before it is read."""
    return NUM_CLASSES.get(name, 10), CHANNELS.get(name, 3)


def _missing(name, root, err):
    return InputError(f"{name} not found in {root}/ and it could not be downloaded ({err}); "
                      f"put {SOURCES[name]} in {root}/ or pass --data-dir to where it is")


def _download(name, root, download, fetch):
    """fetch() the data set, every failure one line naming what to put where."""
    if not download:
        raise _missing(name, root, "download disabled")
    try:
        return fetch()
    except Exception as e:
        raise _missing(name, root, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}") from e


def _torchvision(name, root, download):
    import torchvision.datasets as tvd
    make = {"cifar10": lambda tr, d: tvd.CIFAR10(root, train=tr, download=d),
            "cifar100": lambda tr, d: tvd.CIFAR100(root, train=tr, download=d),
            "svhn": lambda tr, d: tvd.SVHN(root, split="train" if tr else "test", download=d)}[name]
    out = []
    for train in (True, False):
        try:
            ds = make(train, False)
        except RuntimeError:  # not there, or its checksum does not match
            ds = _download(name, root, download, lambda: make(train, True))
        x = torch.from_numpy(ds.data) if name == "svhn" else torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        out += [x.contiguous(), torch.as_tensor(ds.labels if name == "svhn" else ds.targets).long()]
    return out


def read_idx(path):
    """An IDX file (the MNIST format): two zero bytes, the type code 0x08 (unsigned bytes), the number of dimensions
    n, n big-endian int32 sizes, then the data. Gzip-compressed files (magic 1f 8b) are read as well; checksums are
    not required, so recompressed copies (Debian's) are accepted."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError) as e:
        raise InputError(f"{path} is a damaged gzip file ({e}); replace it with an intact copy") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * raw[3]:
        raise InputError(f"{path} is not an IDX file of unsigned bytes; replace it with an intact copy")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3]))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3])
    if body.size != math.prod(dims):
        raise InputError(f"{path} holds {body.size} bytes where its header promises {math.prod(dims)} "
                         f"(truncated?); replace it with an intact copy")
    return body.reshape(dims)


def _idx_dataset(name, root, download):
    """The four IDX files in `root` itself, in torchvision's layout root/<MNIST|FashionMNIST>/raw, plain or .gz, or
    where a system package put them (SYSTEM_DIRS); torchvision downloads them into root when they are in none."""
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]

    def find():
        for d in (root, os.path.join(root, folder, "raw"), *SYSTEM_DIRS.get(name, ())):
            paths = [next((p for p in (os.path.join(d, n), os.path.join(d, n + ".gz")) if os.path.isfile(p)), None)
                     for n in IDX_NAMES]
            if all(paths):
                return paths
    if find() is None:
        import torchvision.datasets as tvd
        _download(name, root, download, lambda: getattr(tvd, folder)(root, train=True, download=True))
    paths = find()
    if paths is None:
        raise _missing(name, root, "the download did not produce the four IDX files")
    tx, ty, sx, sy = (read_idx(p) for p in paths)
    if tx.ndim != 3 or ty.ndim != 1 or len(tx) != len(ty) or sx.ndim != 3 or len(sx) != len(sy):
        raise InputError(f"the IDX files in {os.path.dirname(paths[0])} do not hold N x H x W images and N "
                         f"labels; replace them with the official files")
    other = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}[name]
    if ty[:10].tolist() == FIRST_LABELS[other]:
        raise InputError(f"the files in {os.path.dirname(paths[0])} are {other}, not {name}; pass --dataset "
                         f"{other} or point --data-dir at the {name} files")
    return [torch.from_numpy(a.astype(np.int64) if a.ndim == 1 else a[:, None].copy()) for a in (tx, ty, sx, sy)]


def _tiny_imagenet(root, download):
    """Official layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt; the
    labelled val split serves as the test set. Decoded once into uint8_cache.npz, written atomically."""
    from PIL import Image
    base, archive = os.path.join(root, "tiny-imagenet-200"), os.path.join(root, "tiny-imagenet-200.zip")
    cache = os.path.join(base, "uint8_cache.npz")
    if not os.path.exists(cache):
        if not os.path.isdir(base) and not os.path.exists(archive):
            from torchvision.datasets.utils import download_url
            _download("tiny_imagenet", root, download,
                      lambda: download_url(TINY_URL, root, md5="90528d7ca1a48142e341f4ef8d21d0de"))
        try:
            if not os.path.isdir(base):
                with zipfile.ZipFile(archive) as z:
                    z.extractall(root)
            with open(os.path.join(base, "wnids.txt")) as f:
                label = {w: i for i, w in enumerate(sorted(w.strip() for w in f if w.strip()))}
            train = [(os.path.join(base, "train", w, "images", f), c)
                     for w, c in label.items() for f in sorted(os.listdir(os.path.join(base, "train", w, "images")))]
            with open(os.path.join(base, "val", "val_annotations.txt")) as f:
                test = [(os.path.join(base, "val", "images", p[0]), label[p[1]]) for p in (s.split("\t") for s in f)
                        if len(p) > 1]
        except zipfile.BadZipFile:
            raise InputError(f"{archive} is not a valid zip file; delete it and download it again") from None
        except (OSError, KeyError) as e:
            raise InputError(f"{base} does not have the Tiny ImageNet layout ({e}); delete it and unzip "
                             f"tiny-imagenet-200.zip again") from e
        arrays = {}
        for split, items in (("train", train), ("test", test)):
            arrays[split + "_x"] = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1)
                                             for p, _ in items])
            arrays[split + "_y"] = np.array([c for _, c in items], dtype=np.int64)
        with open(f"{cache}.tmp{os.getpid()}", "wb") as f:  # a killed decode leaves no half cache behind
            np.savez(f, **arrays)
        os.replace(f"{cache}.tmp{os.getpid()}", cache)
    with np.load(cache, allow_pickle=False) as z:
        return [torch.from_numpy(np.ascontiguousarray(z[k])) for k in ("train_x", "train_y", "test_x", "test_y")]


@functools.lru_cache(maxsize=1)  # bench.py builds it once for all its configurations
def _synthetic(n_train=50000, n_test=10000, classes=10, size=32, seed=0):
    """CIFAR-shaped learnable stand-in, for benchmarks and tests: each class is a smooth colour pattern (4x4 random
    values upsampled, so most energy sits at low frequencies as in natural images), each image 3/4 its class's
    pattern and 1/4 uniform noise. Made in chunks of 5,000 images straight into uint8 (184 MB in all): building it
    peaks at about 350 MB more than the process had, not the 1 GB of one draw of everything."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(classes, 3, 4, 4, generator=g), size=size, mode="bilinear")
    templates = (templates * 191).to(torch.uint8)  # 3/4 of the range
    out = []
    for n in (n_train, n_test):
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.empty(n, 3, size, size, dtype=torch.uint8)
        for i in range(0, n, 5000):
            noise = torch.randint(0, 64, (min(5000, n - i), 3, size, size), generator=g, dtype=torch.uint8)
            x[i:i + 5000] = templates[y[i:i + 5000]] + noise  # 1/4 of the range
        out += [x, y]
    return out


# ---------------------------------------------------------------- batches, made on the device

def geometry(n, batch_size, extra=None, fraction=None, max_batches=None):
    """An epoch over n labelled images: (labelled images a global batch, extra images a global batch, the size of each
    global batch). A batch is B labelled images, or B labelled + B extra ones (ISEAT's --rst), or B images of which
    int(f B) are extra (fraction f, as the authors' samplers); an epoch is ceil(n / B) batches (at most max_batches)."""
    b_extra = 0 if extra is None else int(batch_size * (fraction or 1))
    b_lab = batch_size - (b_extra if fraction else 0)
    sizes = [min(b_lab, n - i * b_lab) + b_extra for i in range(math.ceil(n / batch_size))]
    return b_lab, b_extra, sizes[:max_batches]


def batches(x, y, batch_size, shuffle=False, augment=None, seed=None, rank=0, world=1, max_batches=None,
            memory_format=torch.contiguous_format, noise=None, extra=None, extra_per_batch=0):
    """Yields (float images in [0,1], labels, noise) on x's device. `augment`: None, or load()["augment"]. With
    world > 1 every global batch is split across processes (torch.tensor_split, rank order) and process `rank` gets its
    part: the permutation, the augmentation and `noise` (the draw of a training attack's random start: uniform,
    gaussian or unit_ball below, or None) are drawn for the global batch from `seed`, from a
    generator of their own: the data equal those of one process, whatever the step draws. `extra` (attach_extra's)
    joins extra_per_batch extra images to every global batch of `batch_size` labelled ones, in a permutation drawn
    from `seed` on the CPU (the same images wherever the set lives); the joined batch is shuffled, so that every
    process holds the mix of labelled and extra images (as the authors' samplers, for BatchNorm)."""
    g = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
    idx = torch.randperm(len(x), device=x.device, generator=g) if shuffle else torch.arange(len(x), device=x.device)
    nb = min(math.ceil(len(x) / batch_size), max_batches or math.inf)
    mixing = extra is not None and extra_per_batch > 0
    if mixing:  # the extra set's own order: a CPU generator, so that a host-resident set needs no device draw
        order = torch.randperm(len(extra["y"]), generator=torch.Generator().manual_seed(seed + 2**40))  # a stream of
        # its own: no epoch's seed reaches 2**40
        pool = ThreadPoolExecutor(1) if extra["host"] else None  # a host copy: batch i + 1 is read while i trains
        coming = pool.submit(_extra_rows, extra, order, 0, extra_per_batch) if pool else None
    try:
        for i in range(nb):
            j = idx[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[j], y[j]
            if mixing:
                xe, k = coming.result() if pool else _extra_rows(extra, order, i, extra_per_batch)
                if pool and i + 1 < nb:
                    coming = pool.submit(_extra_rows, extra, order, i + 1, extra_per_batch)
                if extra["host"] and x.device.type == "cuda":
                    xe = xe.pin_memory().to(x.device, non_blocking=True)
                mix = torch.randperm(len(yb) + len(k), device=x.device, generator=g)
                xb, yb = torch.cat([xb, xe.to(x.device)])[mix], torch.cat([yb, extra["y"][k.to(x.device)]])[mix]
            if augment and augment.get("idbh"):  # drawn for the whole global batch: the same on every process
                xb = idbh(xb, augment["idbh"], g)
            elif augment:
                xb = random_augment(xb, augment["pad"], augment["flip"], augment["pad_mode"], augment["rotate"], g)
            z = None if noise is None else noise(xb.shape, x.device, g)
            if world > 1:
                xb, yb = xb.tensor_split(world)[rank], yb.tensor_split(world)[rank]
                z = z.tensor_split(world)[rank] if z is not None else None
            xb = xb.float().div_(255).contiguous(memory_format=memory_format)
            yield xb, yb, (z.contiguous(memory_format=memory_format) if z is not None else None)
    finally:  # the reading thread ends with the epoch, also when the loop is left early
        if mixing and pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def uniform(shape, device=None, generator=None):
    """U(0, 1) per pixel: the draw of the L-inf random start x + (2u - 1) eps."""
    return torch.rand(shape, device=device, generator=generator)


def gaussian(shape, device=None, generator=None):
    """N(0, 1) per pixel: the draw of TRADES' and MART's start x + 0.001 z."""
    return torch.randn(shape, device=device, generator=generator)


def unit_ball(shape, device=None, generator=None):
    """A point of the unit L2 ball per image, uniform direction and radius uniform in [0, 1]: the draw of the L2
    random start (Rice et al.)."""
    z = torch.randn(shape, device=device, generator=generator)
    r = torch.rand(shape[0], device=device, generator=generator)
    return z * (r / z.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *([1] * (z.dim() - 1)))


def _extra_rows(extra, order, i, n):
    """Batch i's n extra images (uint8 N,C,H,W) and their indices: indexed where they lie on the device, or read
    from the host's memory map in file order."""
    k = order[(i * n + torch.arange(n)) % len(order)]
    if not extra["host"]:
        return extra["x"][k.to(extra["x"].device)], k
    s = k.argsort()
    return torch.from_numpy(np.ascontiguousarray(extra["x"][k[s].numpy()]))[s.argsort()].permute(0, 3, 1, 2), k


def random_augment(x, pad, flip=True, pad_mode="zero", rotate_deg=0.0, generator=None):
    """Random crop (offsets uniform in [0, 2 pad]), flip (probability 1/2 where allowed) and rotation (uniform in
    [-rotate_deg, rotate_deg]), all drawn per sample from `generator` on x's device."""
    B, kw = x.shape[0], dict(device=x.device, generator=generator)
    oy = torch.randint(0, 2 * pad + 1, (B,), **kw)
    ox = torch.randint(0, 2 * pad + 1, (B,), **kw)
    f = torch.rand(B, **kw) < 0.5 if flip else torch.zeros(B, dtype=torch.bool, device=x.device)
    x = crop_flip(x, pad, oy, ox, f, pad_mode)
    if rotate_deg:
        x = rotate(x, (torch.rand(B, **kw) * 2 - 1) * rotate_deg)
    return x


def crop_flip(x, pad, oy, ox, flip, pad_mode="zero"):
    """Per-sample crop of x (B,C,H,W) padded by `pad`: sample i is padded[i, :, oy_i:oy_i+H, ox_i:ox_i+W], then
    mirrored left-right where flip_i. Offsets are in [0, 2*pad]. pad_mode "zero" pads with 0 (torchvision's
    RandomCrop(padding=pad)), "reflect" mirrors the border without repeating it (padding_mode="reflect").
    Done by index arithmetic on the unpadded tensor, so it works for uint8 images and needs no padded copy."""
    B, C, H, W = x.shape
    rows = oy[:, None] + torch.arange(H, device=x.device) - pad  # B,H source rows (may fall outside 0..H-1)
    cols = ox[:, None] + torch.arange(W, device=x.device) - pad  # B,W
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=x.device)[:, None, None]
    if pad_mode == "reflect":
        rows, cols = rows.abs(), cols.abs()
        rows = torch.where(rows >= H, 2 * (H - 1) - rows, rows)
        cols = torch.where(cols >= W, 2 * (W - 1) - cols, cols)
        return x[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # B,H,W,C -> B,C,H,W
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # B,H,W
    out = x[b, :, rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]  # B,H,W,C
    return out.masked_fill(~inside[..., None], 0).permute(0, 3, 1, 2)


def rotate(x, degrees):
    """Rotates each uint8 image x[i] (B,C,H,W) by degrees[i] about its centre, counter-clockwise, nearest-neighbour
    sampling and zero fill: torchvision's rotate (RandomRotation with its defaults), which is affine with -angle."""
    zero = torch.zeros_like(degrees, dtype=torch.float64)
    return affine_nearest(x, -degrees.double(), zero, zero)


# ---------------------------------------------------------------- the global batch under torchrun

def start_processes(device="cuda", timeout=600.0):
    """torchrun: one process per GPU (gloo: per CPU process); returns (processes, this one's rank, its device), a CUDA
    device being the process's own, cuda:LOCAL_RANK. The store outlives a restart (--max-restarts): each attempt's keys
    get a prefix, or a process would read a dead one's. Without torchrun: (1, 0, the device; "cuda" is cuda:0)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if world > 1 else device.index or 0)
        torch.cuda.set_device(device)  # the process's own GPU, for NCCL and every allocation
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout)
        store = next(dist.rendezvous("env://", timeout=timeout))[0]
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                                timeout=timeout)
        # gatherer's all_gather is marked deprecated in favour of a private module; it is the public API that works on
        # every supported torch: its warning is silenced once, in torchrun's processes only
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated")
    return world, rank, device


def lost_contact(e):
    """A RuntimeError under torchrun: the one error line when a collective failed (gloo's and NCCL's errors say so),
    else the error itself, raised again with its traceback."""
    if "WORLD_SIZE" not in os.environ or not any(w in str(e) for w in ("gloo", "NCCL", "onnection", "imed out")):
        raise e
    return (f"error: rank {os.environ.get('RANK', '?')} lost contact with the other processes "
            f"({str(e).strip().splitlines()[0][:120]}); use torchrun --max-restarts N, --resume")


def gatherer(n, world):
    """gather(t): the concatenation over ranks of t (this rank's share of a global batch of n, as batches() splits
    it), in the global batch's order, with autograd. Its backward sums every rank's gradient for this rank's rows: when
    each rank computes the same global term from the gathered tensor, rank r gets N times its rows' gradient, and
    DDP's averaging over the N ranks leaves exactly the one-process gradient."""
    from torch.distributed.nn.functional import all_gather
    sizes = [n // world + (r < n % world) for r in range(world)]  # torch.tensor_split's shares
    m = max(sizes)

    def gather(t):
        if len(t) < m:  # all_gather takes equal shapes: pad, then drop the padding
            t = torch.cat([t, t.new_zeros(m - len(t), *t.shape[1:])])
        return torch.cat([part[:s] for part, s in zip(all_gather(t), sizes)])
    return gather


def average_over_ranks(tensors):
    """The mean over ranks of each tensor (one all-reduce of them all); for gradients taken outside DDP's backward."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


# ---------------------------------------------------------------- extra and generated training images
# Carmon et al.'s ti_500K_pseudo_labeled.pickle (`data`: N x 32 x 32 x 3 uint8, `extrapolated_targets`) and the
# generated-image .npz files of Rebuffi et al. / Wang et al. (`image`, `label`). A pickle is code: it is read by an
# unpickler that builds numpy arrays and nothing else. An uncompressed .npz member is memory-mapped where it lies; a
# compressed one is decompressed once into a .npy cache beside the run's data (--data-dir), then memory-mapped.
_ARRAY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {  # what numpy's own arrays
    (f"numpy.{core}.{module}", name) for core in ("core", "_core")  # name in pickle protocols 0-5, numpy 1 and 2
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


def attach_extra(path, ds, device, where="auto", cache_dir="data"):
    """The extra set for batches(): on the device when `where` is device, or auto and it takes under a quarter of
    the GPU's free memory (always on a CPU); else on the host, memory-mapped, each batch read while the step before
    runs. Labels live on the device."""
    images, labels = load_extra(path, tuple(ds["train_x"].shape[1:]), ds["num_classes"], cache_dir)
    if where == "auto":
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
        where = "device" if images.nbytes < free / 4 else "host"
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous().to(device) if where == "device" else images
    return dict(x=x, y=labels.to(device), host=where == "host", path=path)


def load_extra(path, shape, num_classes, cache_dir="data"):
    """The extra training images of `path` as (N x H x W x C uint8 array-like, int64 labels): checked against the
    data set's image shape (C, H, W) and classes, each problem one line."""
    if not os.path.isfile(path):
        raise InputError(f"--extra-data {path} does not exist")
    if path.endswith(".npz"):
        try:
            with zipfile.ZipFile(path) as z:
                names = [n[:-4] for n in z.namelist()]
        except zipfile.BadZipFile:
            raise InputError(f"{path} is not an .npz file (a zip of .npy arrays)") from None
        if "image" not in names or "label" not in names:
            raise InputError(f"{path} holds {', '.join(names)}; the generated-image files hold image and label")
        images, labels = _npz_member(path, "image", cache_dir), np.asarray(_npz_member(path, "label", cache_dir))
    else:
        images, labels = _read_pickle(path)
    C, H, W = shape
    if images.ndim != 4 or tuple(images.shape[1:]) != (H, W, C) or images.dtype != np.uint8:
        raise InputError(f"{path}: images of shape {tuple(images.shape)} and type {images.dtype}; this data set "
                         f"needs N x {H} x {W} x {C} uint8")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{path}: {labels.shape} {labels.dtype} labels for {len(images)} images; give one "
                         f"integer label per image")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{path}: labels {labels.min()} .. {labels.max()} fall outside the data set's "
                         f"{num_classes} classes")
    return images, torch.from_numpy(labels.astype(np.int64))


def _read_pickle(path):
    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _ARRAY_GLOBALS:
                return super().find_class(module, name)
            raise InputError(f"refusing to load {path}: the pickle holds {module}.{name}, not only arrays (a "
                             f"pickle is code); save its arrays with numpy.savez(FILE.npz, image=..., label=...)")
    try:
        with open(path, "rb") as f:
            obj = ArraysOnly(f).load()
    except InputError:  # find_class's refusal, as it is
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise InputError(f"cannot read {path} as a pickle ({str(e)[:100]}); pass the intact file") from None
    if not isinstance(obj, dict) or "data" not in obj or "extrapolated_targets" not in obj:
        raise InputError(f"{path} holds {type(obj).__name__}"
                         f"{' with keys ' + ', '.join(map(str, obj)) if isinstance(obj, dict) else ''}; Carmon et "
                         f"al.'s pickle is a dict with data and extrapolated_targets")
    return np.asarray(obj["data"]), np.asarray(obj["extrapolated_targets"])


def _npz_member(path, name, cache_dir):
    """One array of an .npz, memory-mapped: in place when stored uncompressed, else from a .npy cache."""
    def header(f):  # (shape, fortran order, dtype) of an .npy, read with numpy's public readers; numbers only
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise InputError(f"{path}: {name} is an .npy of format {version}; save it with numpy.savez")
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                                 np.lib.format.read_array_header_2_0)(f)
        if dtype.hasobject:
            raise InputError(f"{path}: {name} holds Python objects, not numbers; save plain arrays")
        return shape, fortran, dtype
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)  # the member's local header: its data follow the name and the extra field
                f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") +
                       int.from_bytes(local[28:30], "little"))
                shape, fortran, dtype = header(f)
                offset = f.tell()
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{name}.{info.CRC:08x}.npy")
        if not os.path.exists(cache):
            with z.open(info) as member:
                header(member)  # numbers only, checked before anything is written
            os.makedirs(cache_dir, exist_ok=True)
            print(f"decompressing {name} of {path} once into {cache} (a memory-mapped copy)")
            with z.open(info) as member, open(f"{cache}.tmp{os.getpid()}", "wb") as out:
                shutil.copyfileobj(member, out, 1 << 24)  # 16 MB at a time: a 20M-image file never sits in memory
            os.replace(f"{cache}.tmp{os.getpid()}", cache)
        return np.load(cache, mmap_mode="r")


# ---------------------------------------------------------------- IDBH (Li and Spratling, ICLR 2023), on the device
# Per image: horizontal flip (p 1/2), CropShift, one colour/shape operation drawn from a table with a random strength,
# random erasing. Every parameter is drawn per image for the whole batch from the epoch's generator, every operation
# runs on the whole batch and each image keeps its own: no loop over images, no host sync. Each operation equals
# torchvision's functional op on a uint8 tensor image. The released code runs torchvision's PIL path, which rounds
# differently: 1.7-3.8 % of the pixels differ through the whole pipeline (nearly all by 1/255; see the README).
IDBH_VARIANTS = {  # name: (CropShift's strengths {0 .. n-1}, table, erasing probability, erasing's largest area)
    "idbh-cifar10-weak": (11, "colour", 0.5, 0.33),
    "idbh-cifar10-strong": (11, "colour", 1.0, 0.33),
    "idbh-svhn": (9, "shape", 1.0, 0.5),
}
IDBH_OPS = ("saturation", "brightness", "contrast", "sharpness", "autocontrast", "equalize", "shear", "rotate")
IDBH_TABLES = {  # the probability of each op, and the strength ranges (shear in radians, rotation in whole degrees)
    "colour": dict(p=(1 / 8,) * 8, shear=(0.05, 0.15), rotate=(1, 11)),
    "shape": dict(p=(0.08, 0.08, 0.04, 0.08, 0.04, 0.08, 0.3, 0.3), shear=(0.05, 0.35), rotate=(1, 31)),
}
COLOUR_RANGES = {"saturation": (0.1, 1.9), "brightness": (0.5, 1.9), "contrast": (0.5, 1.9), "sharpness": (0.1, 1.9)}


def _per_image(v, x):
    return v.view(-1, *([1] * (x.dim() - 1)))


def blend(x, other, ratio):
    """torchvision's _blend on uint8 images, ratio per image (float64): ratio x + (1 - ratio) other, clamped,
    truncated to uint8."""
    a, b = _per_image(ratio.float(), x), _per_image((1 - ratio).float(), x)
    return (a * x + b * other).clamp(0, 255).to(torch.uint8)


def grey(x):
    """rgb_to_grayscale of uint8 images (truncated to uint8); grey images as they are."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(x.dtype)[:, None]


def adjust(x, op, ratio):
    """adjust_saturation / brightness / contrast / sharpness of uint8 images, the factor per image."""
    if op == "saturation":
        return x if x.shape[1] == 1 else blend(x, grey(x), ratio)
    if op == "brightness":
        return blend(x, torch.zeros_like(x), ratio)
    if op == "contrast":
        return blend(x, grey(x).float().mean(dim=(1, 2, 3), keepdim=True), ratio)
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(x.shape[1], 1, 3, 3)
    blurred = x.clone()  # the border keeps the image's own pixels
    blurred[..., 1:-1, 1:-1] = F.conv2d(x.float(), kernel, groups=x.shape[1]).round().to(torch.uint8)
    return blend(x, blurred, ratio)


def autocontrast(x):
    """autocontrast of uint8 images: each channel stretched to 0..255 (a constant channel left as it is)."""
    lo, hi = x.amin(dim=(-2, -1), keepdim=True).float(), x.amax(dim=(-2, -1), keepdim=True).float()
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(lo), 255 / (hi - lo))
    return ((x - torch.where(flat, torch.zeros_like(lo), lo)) * scale).clamp(0, 255).to(torch.uint8)


def equalize(x):
    """equalize of uint8 images (torchvision's, per channel): the histogram's cumulative sum as a look-up table,
    step = (pixels - count of the largest value present) // 255; step 0 leaves the channel as it is."""
    B, C = x.shape[:2]
    v = x.reshape(B * C, -1).long()
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    top = 255 - (hist.flip(1) > 0).long().argmax(1)  # the largest value present
    step = (v.shape[1] - hist.gather(1, top[:, None])[:, 0]).div(255, rounding_mode="floor")
    lut = (hist.cumsum(1) + step.div(2, rounding_mode="floor")[:, None]).div(step.clamp(min=1)[:, None],
                                                                              rounding_mode="floor")
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    out = torch.where(step[:, None] == 0, v, lut.gather(1, v))
    return out.to(torch.uint8).view_as(x)


def affine_nearest(x, angle, shear_x, shear_y):
    """torchvision's affine (and rotate, with -angle) about the image centre: nearest-neighbour sampling, fill 0,
    per-image angle and shears in degrees (float64); the inverse matrix and the sampling grid built as
    torchvision builds them."""
    B, C, H, W = x.shape
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    zero = torch.zeros_like(a)
    theta = torch.stack([d, -b, zero, -c, a, zero], 1).float().view(B, 2, 3)
    base = torch.empty(1, H, W, 3, device=x.device)
    base[..., 0].copy_(torch.linspace(-W * 0.5 + 0.5, W * 0.5 - 0.5, steps=W, device=x.device))
    base[..., 1].copy_(torch.linspace(-H * 0.5 + 0.5, H * 0.5 - 0.5, steps=H, device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * W, 0.5 * H], device=x.device)
    grid = base.view(1, H * W, 3).expand(B, -1, -1).bmm(rescaled).view(B, H, W, 2)
    out = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().to(x.dtype)


def crop_shift(x, cx, cy, ox1, oy1, ox2, oy2):
    """CropShift per image: cut a (W - cx) x (H - cy) window at (ox1, oy1), pad it with zeros by cx left and right
    and cy top and bottom, cut W x H at (ox2, oy2): the content moves, the border is black."""
    B, C, H, W = x.shape
    r = torch.arange(H, device=x.device)[None] + (oy2 - cy)[:, None]  # B,H: rows of the window
    c = torch.arange(W, device=x.device)[None] + (ox2 - cx)[:, None]
    inside = ((r >= 0) & (r < (H - cy)[:, None]))[:, :, None] & ((c >= 0) & (c < (W - cx)[:, None]))[:, None, :]
    rows, cols = (r + oy1[:, None]).clamp(0, H - 1), (c + ox1[:, None]).clamp(0, W - 1)
    b = torch.arange(B, device=x.device)[:, None, None]
    out = x[b, :, rows[:, :, None], cols[:, None, :]]  # B,H,W,C
    return out.masked_fill(~inside[..., None], 0).permute(0, 3, 1, 2)


def erase(x, i, j, h, w):
    """Random erasing's rectangle per image (value 0; h = 0: none)."""
    H, W = x.shape[-2:]
    rows = torch.arange(H, device=x.device)[None]
    cols = torch.arange(W, device=x.device)[None]
    box = (((rows >= i[:, None]) & (rows < (i + h)[:, None]))[:, :, None]
           & ((cols >= j[:, None]) & (cols < (j + w)[:, None]))[:, None, :])
    return x.masked_fill(box[:, None], 0)


def idbh_params(B, H, W, variant, g, device):
    """Every random draw of IDBH for a batch, in a fixed order from generator g (float64 strengths)."""
    shifts, table, p_erase, max_area = IDBH_VARIANTS[variant]
    t = IDBH_TABLES[table]
    u = lambda *shape: torch.rand(*shape, device=device, generator=g, dtype=torch.float64)  # noqa: E731
    pick = lambda n, low=0: (u(B) * n).long().clamp(max=n - 1) + low  # noqa: E731 (uniform in low .. low + n - 1)
    p = {"flip": u(B) < 0.5}
    s = pick(shifts)  # CropShift: strength s, split as cx + cy, two offsets each
    p["cx"] = (u(B) * (s + 1)).long().clamp(max=s)
    p["cy"] = s - p["cx"]
    for k, n in (("ox1", "cx"), ("oy1", "cy"), ("ox2", "cx"), ("oy2", "cy")):
        p[k] = (u(B) * (p[n] + 1)).long().clamp(max=p[n])
    cum = torch.tensor(t["p"], dtype=torch.float64, device=device).cumsum(0)
    p["op"] = torch.searchsorted(cum, u(B), right=True).clamp(max=len(IDBH_OPS) - 1)
    p["strength"] = u(B)  # in [0, 1), scaled per op below
    p["axis_x"], p["negative"] = u(B) < 0.5, u(B) < 0.5
    lo, hi = t["shear"]
    p["shear"] = torch.rad2deg(lo + p["strength"] * (hi - lo)) * torch.where(p["negative"], -1.0, 1.0)
    lo, hi = t["rotate"]
    p["rotate"] = ((lo + p["strength"] * (hi - lo)).floor() * torch.where(p["negative"], -1.0, 1.0))
    # random erasing (torchvision's RandomErasing, value 0): up to 10 tries of an area and an aspect ratio
    area = H * W * (0.02 + u(B, 10) * (max_area - 0.02))
    ratio = torch.exp(math.log(0.3) + u(B, 10) * (math.log(3.3) - math.log(0.3)))
    h, w = (area * ratio).sqrt().round().long(), (area / ratio).sqrt().round().long()
    fits = (h < H) & (w < W)
    first = fits.long().argmax(1)
    ok = fits.any(1) & (u(B) < p_erase)
    h, w = h.gather(1, first[:, None])[:, 0] * ok, w.gather(1, first[:, None])[:, 0] * ok
    p["erase"] = ((u(B) * (H - h + 1)).long().clamp(max=H - h), (u(B) * (W - w + 1)).long().clamp(max=W - w), h, w)
    return p


def idbh(x, variant, g):
    """IDBH (`variant`, a key of IDBH_VARIANTS) on a uint8 batch (B,C,H,W) on its device, parameters drawn from
    generator g; returns uint8."""
    B, C, H, W = x.shape
    p = idbh_params(B, H, W, variant, g, x.device)
    x = torch.where(_per_image(p["flip"], x), x.flip(-1), x)
    x = crop_shift(x, **{k: p[k] for k in ("cx", "cy", "ox1", "oy1", "ox2", "oy2")})
    out, zero = x, torch.zeros_like(p["shear"])
    for k, op in enumerate(IDBH_OPS):  # every op on the whole batch; each image keeps the one it drew
        if op in COLOUR_RANGES:
            lo, hi = COLOUR_RANGES[op]
            y = adjust(x, op, lo + p["strength"] * (hi - lo))
        elif op == "autocontrast":
            y = autocontrast(x)
        elif op == "equalize":
            y = equalize(x)
        elif op == "shear":
            y = affine_nearest(x, zero, torch.where(p["axis_x"], p["shear"], zero),
                               torch.where(p["axis_x"], zero, p["shear"]))
        else:  # torchvision's rotate is affine with the angle negated
            y = affine_nearest(x, -p["rotate"], zero, zero)
        out = torch.where(_per_image(p["op"] == k, x), y, out)
    return erase(out, *p["erase"])  # value 0: the same before or after the conversion to [0, 1]
