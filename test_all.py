"""The test suite: runs on a CPU in a few minutes, with no network.

    python -m pytest -q test_all.py                      # CPU
    DEVICE=cuda python -m pytest -q test_all.py          # the same on a GPU: channels_last, bf16 autocast, CUDA
                                                         # generators, fork_rng, --compile (inductor) and AutoAttack
                                                         # on CUDA; the gloo torchrun tests stay on the CPU

Data sets are written small and synthetic in their real on-disk formats (CIFAR python pickles, SVHN .mat files,
MNIST IDX files, the Tiny ImageNet folder layout) and read by the real loading code; torchvision's checksums are
patched to the synthetic files' own. One test trains on real Fashion-MNIST images when Debian's
dataset-fashion-mnist package is installed (.ci/run installs it). Every formula is compared with a slow, obvious
computation.
"""
import argparse
import copy
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import subprocess
import sys

import at
import attacks
import data
import eval as evaluate
import iseat
import mart
import models
import sar
import spectral
import trades
import wa

torch.set_num_threads(2)
DEV = os.environ.get("DEVICE", "cpu")  # the device of every test that trains, attacks or evaluates
ON_CUDA = DEV.startswith("cuda")
if ON_CUDA:  # exact comparisons with slow reference computations: no TF32 rounding in either
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
FMNIST = "/usr/share/datasets/fashion-mnist"


def ev(argv):
    """eval.py on the test device."""
    return evaluate.main(argv + ["--device", DEV])


def same(a, b):
    """Bitwise on the CPU; on CUDA, where some kernels are not deterministic, to float tolerance."""
    if ON_CUDA:
        return torch.allclose(a.float().cpu(), b.float().cpu(), rtol=1e-3, atol=1e-4)
    return torch.equal(a, b)


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


# ---------------------------------------------------------------- synthetic data sets in their real formats

def write_cifar(root, monkeypatch, classes=10, per_batch=40, n_test=48, seed=0):
    """CIFAR-10: cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta; CIFAR-100: cifar-100-python/train,
    test, meta. Each a pickled dict with 'data' (N x 3072 uint8, planes R, G, B, rows in order) and labels."""
    import torchvision.datasets as tvd
    rng = np.random.default_rng(seed)
    cls = tvd.CIFAR10 if classes == 10 else tvd.CIFAR100
    folder = os.path.join(root, cls.base_folder)
    os.makedirs(folder, exist_ok=True)
    label_key = "labels" if classes == 10 else "fine_labels"
    train_names = [n for n, _ in cls.train_list]
    sizes = [per_batch] * len(train_names) if classes == 10 else [per_batch * 5]
    images = {}

    def write(name, n):
        # class-dependent brightness so a model can learn something
        y = rng.integers(0, classes, n)
        x = (rng.integers(0, 128, (n, 32, 32, 3)) + (y * (127 // classes))[:, None, None, None]).astype(np.uint8)
        entry = {"data": x.transpose(0, 3, 1, 2).reshape(n, 3072), label_key: [int(v) for v in y]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
        images[name] = (x, y)

    for name, n in zip(train_names, sizes):
        write(name, n)
    write(cls.test_list[0][0], n_test)
    meta = dict(cls.meta)
    with open(os.path.join(folder, meta["filename"]), "wb") as f:
        pickle.dump({meta["key"]: [f"class{i}" for i in range(classes)]}, f, protocol=2)
    monkeypatch.setattr(cls, "train_list", [[n, md5(os.path.join(folder, n))] for n in train_names])
    monkeypatch.setattr(cls, "test_list", [[cls.test_list[0][0], md5(os.path.join(folder, cls.test_list[0][0]))]])
    monkeypatch.setattr(cls, "meta", dict(meta, md5=md5(os.path.join(folder, meta["filename"]))))
    train_x = np.concatenate([images[n][0] for n in train_names])
    train_y = np.concatenate([images[n][1] for n in train_names])
    return train_x, train_y, *images[cls.test_list[0][0]]


def write_tiny_imagenet(root, classes=3, per_class=4, n_val=6, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "tiny-imagenet-200")
    wnids = [f"n{1000 + 7 * i:08d}" for i in range(classes)][::-1]  # not in sorted order in the file
    os.makedirs(os.path.join(base, "val", "images"))
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    for w in wnids:
        d = os.path.join(base, "train", w, "images")
        os.makedirs(d)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(os.path.join(d, f"{w}_{i}.JPEG"))
        with open(os.path.join(base, "train", w, f"{w}_boxes.txt"), "w") as f:
            f.write("")
    val_labels = []
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        for i in range(n_val):
            w = wnids[i % classes]
            img = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # a grayscale file: must become RGB
            Image.fromarray(img).save(os.path.join(base, "val", "images", f"val_{i}.JPEG"))
            f.write(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n")
            val_labels.append(sorted(wnids).index(w))
    return base, sorted(wnids), val_labels


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    arrays = write_cifar(root, monkeypatch)
    return root, arrays


# ---------------------------------------------------------------- attacks

def linear_model(W, b):
    m = nn.Sequential(nn.Flatten(), nn.Linear(W.shape[1], W.shape[0]))
    with torch.no_grad():
        m[1].weight.copy_(W)
        m[1].bias.copy_(b)
    return m


def test_pgd_reaches_linear_worst_case():
    """Two-class linear model: CE is maximised by x + eps * sign(w_other - w_y), clipped to [0,1]; PGD-10 with
    step eps/4 gets there from any start in the ball (each coordinate needs at most 2 eps / alpha = 8 steps)."""
    torch.manual_seed(0)
    W, b = torch.randn(2, 3 * 4 * 4), torch.zeros(2)
    model = linear_model(W, b).to(DEV)
    x = torch.rand(16, 3, 4, 4)
    x[:4] = 0.0  # on the box's faces: clipping must bind
    x[4:8] = 1.0
    y = torch.randint(0, 2, (16,))
    eps = 8 / 255
    direction = torch.sign(W[1 - y] - W[y]).view_as(x)
    expected = (x + eps * direction).clamp(0, 1).to(DEV)
    x, y = x.to(DEV), y.to(DEV)
    for random_start in (False, True):
        x_adv = attacks.pgd(model, x, y, eps=eps, alpha=2 / 255, steps=10, random_start=random_start)
        assert torch.allclose(x_adv, expected, atol=1e-6)
    # FGSM: one step of size eps from x is already optimal for a linear model
    assert torch.allclose(evaluate.fgsm(model, x, y, eps), expected, atol=1e-6)
    # the CW margin has the same optimum here
    assert torch.allclose(attacks.pgd(model, x, y, eps, 2 / 255, 10, loss="cw"), expected, atol=1e-6)


def test_pgd_stays_in_ball_and_box_and_leaves_model_alone():
    torch.manual_seed(0)
    model = models.get_model("cnn", 10).to(DEV)
    model.train()
    x, y = torch.rand(8, 3, 8, 8, device=DEV), torch.randint(0, 10, (8,), device=DEV)
    for norm, eps in (("Linf", 8 / 255), ("L2", 0.5)):
        x_adv = attacks.pgd(model, x, y, eps=eps, alpha=eps / 4, steps=5, norm=norm)
        d = (x_adv - x).flatten(1)
        size = d.abs().max(1).values if norm == "Linf" else d.norm(dim=1)
        assert size.max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert not x_adv.requires_grad
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    attacks.pgd(model, x, y, steps=2)
    assert not model.training


def test_cw_loss_matches_slow_loop():
    torch.manual_seed(0)
    z, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    slow = torch.tensor([max(z[i, j] for j in range(5) if j != y[i]) - z[i, y[i]] for i in range(6)])
    assert torch.allclose(attacks.cw_loss(z, y), slow)


def linear_worst_case(W, b, x, y, eps):
    """Exact L-inf robustness of a linear classifier on the [0,1] box: image i is robust iff for every j != y_i the
    minimum of the margin (w_y - w_j) x + (b_y - b_j) over the ball and box, reached coordinate-wise at
    clip(x - eps * sign(w_y - w_j)), stays positive."""
    robust = []
    for xi, yi in zip(x.flatten(1), y):
        ok = True
        for j in range(W.shape[0]):
            if j != yi:
                d = W[yi] - W[j]
                xw = (xi - eps * torch.sign(d)).clamp(0, 1)
                ok &= bool(d @ xw + b[yi] - b[j] > 0)
        robust.append(ok)
    return torch.tensor(robust)


def test_autoattack_matches_exact_linear_worst_case():
    torch.manual_seed(1)
    W, b = torch.randn(10, 3 * 6 * 6) * 0.5, torch.zeros(10)
    x = torch.rand(40, 3, 6, 6)
    y = (x.flatten(1) @ W.T + b).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # a few misclassified to begin with
    eps = 8 / 255
    exact = linear_worst_case(W, b, x, y, eps).to(DEV)
    assert 5 < exact.sum() < 35  # the test is only meaningful with robust and non-robust images
    model = linear_model(W, b).to(DEV)
    model.train()
    x, y = x.to(DEV), y.to(DEV)
    rng_before = torch.get_rng_state()
    cuda_rng_before = torch.cuda.get_rng_state() if ON_CUDA else None
    got = evaluate.autoattack(model, x, y, eps=eps, batch_size=16, seed=0)
    assert torch.equal(got, exact)
    assert torch.equal(evaluate.autoattack(model, x, y, eps=eps, batch_size=16, n_examples=10), exact[:10])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the library's reseeding does not leak out
    if ON_CUDA:  # fork_rng on the CUDA generator too
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng_before)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    # PGD can never beat the exact worst case (untargeted CE may miss the weakest of 9 pairs: hence AutoAttack)
    pgd_ok = attacks.correct(model, x, y, 16, attack=attacks.pgd, eps=eps, alpha=2 / 255, steps=20)
    assert pgd_ok[exact].all() and pgd_ok.sum() < 40
    # FGSM is exact on a linear model only for two classes; here it can only be weaker than the worst case
    fgsm_ok = attacks.correct(model, x, y, 16, attack=evaluate.fgsm, eps=eps)
    assert fgsm_ok[exact].all() and fgsm_ok.sum() >= pgd_ok.sum()


def test_frozen_evaluation_uses_eval_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.rand(4, 3, 5, 5))
    model = model.to(DEV).train()
    before = copy.deepcopy(model[1].state_dict())
    attacks.correct(model, torch.rand(8, 3, 5, 5, device=DEV), torch.zeros(8, dtype=torch.long, device=DEV), 4,
                    attack=attacks.pgd, steps=2)
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics did not move during the attack
    assert model.training and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- weight averaging

def tiny_bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def set_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [model[1].running_mean, model[1].running_var]:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def test_ema_matches_hand_computation():
    for warmup in (False, True):
        model = tiny_bn_model()
        avg = wa.averaged(model, "ema", decay=0.9, warmup=warmup)
        history = []
        for t in range(4):
            set_weights(model, t)
            avg.update_parameters(model)  # what every method file does after each optimiser step
            history.append({k: v.clone() for k, v in model.state_dict().items()})
        for k in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
            e = history[0][k]
            for t in range(1, 4):
                d = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
                e = d * e + (1 - d) * history[t][k]
            assert torch.allclose(avg.module.state_dict()[k], e, atol=1e-6), (warmup, k)


def test_swa_matches_hand_computation_and_recomputes_batchnorm():
    model = tiny_bn_model()
    avg = wa.averaged(model, "swa")
    xs = torch.randn(32, 3)
    ws = []
    for epoch in range(5):
        set_weights(model, epoch)
        ws.append({k: v.clone() for k, v in model.state_dict().items()})
        if epoch >= 2:  # what every method file does at the end of an epoch from the first milestone on
            avg.update_parameters(model)
            torch.optim.swa_utils.update_bn([(xs, None)], avg.module)  # what wa.update_bn runs
        assert int(avg.n_averaged) == max(0, epoch - 1)
    sd = avg.module.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.allclose(sd[k], sum(w[k] for w in ws[2:]) / 3, atol=1e-6)
    # BatchNorm statistics: recomputed from the data through the averaged Linear layer (one batch: exact moments)
    h = xs @ sd["0.weight"].T + sd["0.bias"]
    assert torch.allclose(sd["1.running_mean"], h.mean(0), atol=1e-5)
    assert torch.allclose(sd["1.running_var"], h.var(0, unbiased=True), atol=1e-4)


# ---------------------------------------------------------------- data

@pytest.mark.parametrize("pad_mode", ["zero", "reflect"])
def test_crop_flip_moves_pixels_as_specified(pad_mode):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    pad = 2
    oy, ox = torch.randint(0, 2 * pad + 1, (6,)), torch.randint(0, 2 * pad + 1, (6,))
    flip = torch.tensor([True, False, True, False, True, True])
    got = data.crop_flip(x, pad, oy, ox, flip, pad_mode)
    for i in range(6):  # numpy's padding (torchvision's RandomCrop zero / padding_mode="reflect"), then a slice
        padded = np.pad(x[i].numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="constant" if pad_mode == "zero"
                        else "reflect")
        want = padded[:, oy[i]:oy[i] + 5, ox[i]:ox[i] + 7]
        if flip[i]:
            want = want[:, :, ::-1]
        assert np.array_equal(got[i].numpy(), want), i
    # random_augment: every output is one of the (2 pad + 1)^2 * 2 allowed crops of its input, and offsets vary
    out = data.random_augment(x.repeat(20, 1, 1, 1), pad, pad_mode=pad_mode)
    seen = set()
    for i in range(len(out)):
        src = x[i % 6]
        match = [(a, c, f) for a in range(5) for c in range(5) for f in (False, True)
                 if torch.equal(out[i], data.crop_flip(src[None], pad, torch.tensor([a]), torch.tensor([c]),
                                                       torch.tensor([f]), pad_mode)[0])]
        assert match, i
        seen.update(match)
    assert len(seen) > 10
    # no flip where it would change the label (digits)
    out = data.random_augment(x.repeat(20, 1, 1, 1), 0, flip=False)
    assert torch.equal(out, x.repeat(20, 1, 1, 1))


def test_rotation_matches_torchvision():
    """--rotate: the same pixels as torchvision's RandomRotation (nearest, zero fill) at the drawn angles."""
    import torchvision.transforms.functional as TF
    torch.manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    angles = torch.tensor([90.0, 15.0, -13.7, 7.3, 0.0])
    got = data.rotate(x, angles)
    for i, a in enumerate(angles.tolist()):
        assert torch.equal(got[i], TF.rotate(x[i], a, interpolation=TF.InterpolationMode.NEAREST)), a
    assert torch.equal(got[0], torch.rot90(x[0], 1, (1, 2)))  # counter-clockwise
    # drawn uniformly in [-15, 15]: each output equals a rotation of its input by some angle in that range
    out = data.random_augment(x[:1].repeat(8, 1, 1, 1), 0, flip=False, rotate_deg=15,
                              generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.randint(0, 1, (8,), generator=g), torch.randint(0, 1, (8,), generator=g)
    drawn = (torch.rand(8, generator=g) * 2 - 1) * 15
    assert drawn.abs().max() <= 15 and drawn.std() > 3
    for i in range(8):
        assert torch.equal(out[i], TF.rotate(x[0], drawn[i].item(), interpolation=TF.InterpolationMode.NEAREST))


def test_batches_cover_the_data_once_and_shard_across_ranks():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    y = torch.arange(10)
    torch.manual_seed(0)
    got = torch.cat([yb for _, yb, _ in data.batches(x, y, 4, shuffle=True)])
    assert sorted(got.tolist()) == list(range(10))
    xb, yb, _ = next(data.batches(x, y, 4))
    assert xb.dtype == torch.float32 and torch.allclose(xb[:, 0, 0, 0] * 255, yb.float())
    parts = []
    for rank in range(2):
        torch.manual_seed(0)
        parts.append([yb.tolist() for _, yb, _ in data.batches(x, y, 4, shuffle=True, rank=rank, world=2)])
    for a, b, whole in zip(*parts, [yb.tolist() for _, yb, _ in data.batches(x, y, 4, shuffle=False)]):
        assert len(a) + len(b) == len(whole)
    merged = sorted(sum(parts[0], []) + sum(parts[1], []))
    assert merged == list(range(10))
    assert len(list(data.batches(x, y, 4, max_batches=2))) == 2


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles_are_read(tmp_path, monkeypatch, classes):
    root = str(tmp_path)
    tx, ty, sx, sy = write_cifar(root, monkeypatch, classes=classes)
    ds = data.load(f"cifar{classes}", root, val_size=30)
    assert ds["num_classes"] == classes and ds["augment"]["pad"] == 4 and ds["augment"]["flip"]
    assert ds["channels"] == 3
    assert ds["test_x"].shape == (len(sx), 3, 32, 32) and ds["test_x"].dtype == torch.uint8
    assert np.array_equal(ds["test_x"].permute(0, 2, 3, 1).numpy(), sx)
    assert np.array_equal(ds["test_y"].numpy(), sy)
    # train + val are a partition of the training set, fixed whatever the run's seed
    assert len(ds["val_x"]) == 30 and len(ds["train_x"]) == len(tx) - 30
    all_x = torch.cat([ds["train_x"], ds["val_x"]]).permute(0, 2, 3, 1).flatten(1).numpy()
    all_y = torch.cat([ds["train_y"], ds["val_y"]]).numpy()
    key = lambda xs, ys: sorted(zip(map(bytes, xs), ys.tolist()))
    assert key(all_x, all_y) == key(tx.reshape(len(tx), -1), ty)
    torch.manual_seed(123)
    again = data.load(f"cifar{classes}", root, val_size=30)
    assert torch.equal(again["val_x"], ds["val_x"])


def test_svhn_mat_files_are_read(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets as tvd
    rng = np.random.default_rng(0)
    split_list = {}
    arrays = {}
    for split, n in (("train", 20), ("test", 8)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        labels = rng.integers(1, 11, (n, 1))  # SVHN labels the digit 0 as 10
        name = f"{split}_32x32.mat"
        scipy.io.savemat(str(tmp_path / name), {"X": X, "y": labels})
        split_list[split] = ["unused", name, md5(tmp_path / name)]
        arrays[split] = (X, labels[:, 0] % 10)
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    ds = data.load("svhn", str(tmp_path), val_size=5)
    X, labels = arrays["test"]
    assert np.array_equal(ds["test_x"].numpy(), X.transpose(3, 2, 0, 1))
    assert np.array_equal(ds["test_y"].numpy(), labels)
    assert not ds["augment"]["flip"]  # digits are not mirror-symmetric


def write_idx(path, array, gz):
    """The IDX format: 0, 0, type 0x08 (unsigned byte), number of dimensions, big-endian int32 sizes, the bytes."""
    import gzip
    raw = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)


def write_mnist_like(folder, first_labels=None, n_train=30, n_test=12, gz=True, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train),
              rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)]
    if first_labels is not None:
        arrays[1][:10] = first_labels
    for name, a in zip(data.IDX_NAMES, arrays):
        write_idx(os.path.join(folder, name + (".gz" if gz else "")), a, gz)
    return arrays


def test_mnist_and_fashion_mnist_idx_files_are_read(tmp_path, monkeypatch):
    from torchvision.datasets.mnist import read_image_file, read_label_file
    # Debian's layout: the four .gz files in one folder, read without any download or checksum
    flat = str(tmp_path / "flat")
    tx, ty, sx, sy = write_mnist_like(flat)
    ds = data.load("fashion_mnist", flat, val_size=5, download=False)
    assert ds["channels"] == 1 and ds["num_classes"] == 10 and ds["test_x"].shape == (12, 1, 28, 28)
    assert np.array_equal(ds["test_x"][:, 0].numpy(), sx) and np.array_equal(ds["test_y"].numpy(), sy)
    assert ds["augment"]["flip"] and ds["augment"]["pad"] == 2
    all_y = torch.cat([ds["train_y"], ds["val_y"]]).sort().values.numpy()
    assert np.array_equal(all_y, np.sort(ty)) and len(ds["val_x"]) == 5
    # torchvision's layout, uncompressed: the same bytes as torchvision's own parser reads
    tv = str(tmp_path / "tv")
    arrays = write_mnist_like(os.path.join(tv, "MNIST", "raw"), gz=False, seed=1)
    raw = os.path.join(tv, "MNIST", "raw")
    assert np.array_equal(data.read_idx(os.path.join(raw, data.IDX_NAMES[0])),
                          read_image_file(os.path.join(raw, data.IDX_NAMES[0])).numpy())
    assert np.array_equal(data.read_idx(os.path.join(raw, data.IDX_NAMES[3])),
                          read_label_file(os.path.join(raw, data.IDX_NAMES[3])).numpy())
    ds = data.load("mnist", tv, val_size=0, download=False)
    assert not ds["augment"]["flip"] and np.array_equal(ds["test_x"][:, 0].numpy(), arrays[2])
    # the official files of one data set are not read as the other (the file names are the same)
    fm = str(tmp_path / "fm")
    write_mnist_like(fm, first_labels=data.FIRST_LABELS["fashion_mnist"])
    with pytest.raises(models.InputError, match="are fashion_mnist, not mnist; pass --dataset fashion_mnist"):
        data.load("mnist", fm, download=False)
    # missing or damaged files: one line each (with no system package's files either)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": [str(tmp_path / "no-package")]})
    with pytest.raises(models.InputError, match="fashion_mnist not found in .*dataset-fashion-mnist"):
        data.load("fashion_mnist", str(tmp_path / "empty"), download=False)
    blob = open(os.path.join(flat, data.IDX_NAMES[2] + ".gz"), "rb").read()
    import gzip
    open(os.path.join(flat, data.IDX_NAMES[2] + ".gz"), "wb").write(gzip.compress(gzip.decompress(blob)[:-100]))
    with pytest.raises(models.InputError, match=r"holds 9308 bytes where its header promises 9408 \(truncated\?\)"):
        data.load("fashion_mnist", flat, download=False)


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f"no Fashion-MNIST files in {FMNIST} "
                    "(apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist_files_are_read(tmp_path):
    ds = data.load("fashion_mnist", FMNIST, val_size=1000, download=False)
    found = data.load("fashion_mnist", str(tmp_path / "no-data-here"), val_size=1000, download=False)  # the package's
    assert torch.equal(found["test_x"], ds["test_x"])  # files are found without --data-dir
    assert ds["train_x"].shape == (59000, 1, 28, 28) and ds["test_x"].shape == (10000, 1, 28, 28)
    assert ds["test_y"][:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the official test labels
    assert torch.bincount(ds["test_y"]).tolist() == [1000] * 10
    with pytest.raises(models.InputError, match="are fashion_mnist, not mnist"):
        data.load("mnist", FMNIST, download=False)


def test_tiny_imagenet_layout_is_read_and_cached(tmp_path):
    from PIL import Image
    base, wnids, val_labels = write_tiny_imagenet(str(tmp_path))
    ds = data.load("tiny_imagenet", str(tmp_path), val_size=2)
    assert ds["num_classes"] == 200 and ds["augment"]["pad"] == 8
    assert ds["test_x"].shape == (6, 3, 64, 64)
    assert ds["test_y"].tolist() == val_labels
    first = np.asarray(Image.open(os.path.join(base, "val", "images", "val_0.JPEG")).convert("RGB"))
    assert np.array_equal(ds["test_x"][0].permute(1, 2, 0).numpy(), first)
    train_y = torch.cat([ds["train_y"], ds["val_y"]]).sort().values.tolist()
    assert train_y == sorted(sum([[i] * 4 for i in range(3)], []))
    # the decoded cache is used from now on: the JPEGs are no longer needed
    assert os.path.exists(os.path.join(base, "uint8_cache.npz"))
    os.remove(os.path.join(base, "val", "images", "val_0.JPEG"))
    assert torch.equal(data.load("tiny_imagenet", str(tmp_path), val_size=2)["test_x"], ds["test_x"])
    # 64-px training (crop padding 8) and evaluation run end to end
    out = tmp_path / "run"
    at.main(["--dataset", "tiny_imagenet", "--data-dir", str(tmp_path), "--arch", "cnn", "--epochs", "1",
             "--batch-size", "4", "--val-size", "2", "--steps", "2", "--out", str(out), "--device", DEV])
    res = ev([str(out / "last.pt"), "--attacks", "clean", "pgd", "--pgd-steps", "2"])
    assert res[str(out / "last.pt")]["ran"]["pgd"]["n_examples"] == 6


# ---------------------------------------------------------------- models

def test_models_shapes_names_and_sizes():
    counts = {"preact_resnet18": 11_172_170, "resnet18": 11_173_962, "wrn34_10": 46_160_474,  # the released counts
              "preact_resnet18_iseat": 11_172_170, "wrn34_10_iseat": 46_160_474, "wrn28_10_iseat": 36_479_194,
              "wrn28_10_silu": 36_479_194, "wrn70_16_silu": 266_796_506}
    for arch in models.ARCHS:
        m = models.get_model(arch, 10).eval()
        if arch in counts:
            assert sum(p.numel() for p in m.parameters()) == counts[arch], arch
        # 3-channel 32- and 64-px images, grey 28-px ones (MNIST, Fashion-MNIST): computed for the small networks,
        # shapes on the meta device for the WideResNets (the same code path, no arithmetic)
        small = not arch.startswith("wrn")
        for c, size in ((3, 32), (3, 64), (1, 28)):
            m = models.get_model(arch, 10, in_channels=c, dataset="fashion_mnist" if c == 1 else None).eval()
            m = m if small else m.to("meta")
            with torch.no_grad():
                assert m(torch.rand(2, c, size, size, device="cpu" if small else "meta")).shape == (2, 10), arch
            assert next(m.parameters()).shape[1] == c
    keys = models.get_model("resnet18", 10).state_dict().keys()
    for k in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
              "layer2.0.shortcut.1.running_mean", "layer4.1.bn2.bias", "linear.weight"):
        assert k in keys
    keys = models.get_model("wrn34_10", 10).state_dict().keys()
    assert {"conv1.weight", "block1.layer.4.conv2.weight", "block2.layer.0.convShortcut.weight", "bn1.weight",
            "fc.bias"} <= set(keys) and not any(k.startswith("block1.layer.5") for k in keys)
    assert "bn.weight" in models.get_model("preact_resnet18", 100).state_dict()
    with pytest.raises(models.InputError, match="unknown arch 'resnet50'"):
        models.get_model("resnet50", 10)


# The authors' networks, computed by hand from the released files' description: functional ops on the state dict's
# tensors, every padding written out, BatchNorm's statistics by hand. Not the models' code path.

def bn_by_hand(sd, name, x, train, momentum, stats):
    if train:  # batch statistics; the running ones move by `momentum`, with the unbiased variance
        mean, var, n = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False), x.numel() / x.shape[1]
        stats[name + ".running_mean"] = (1 - momentum) * sd[name + ".running_mean"] + momentum * mean
        stats[name + ".running_var"] = (1 - momentum) * sd[name + ".running_var"] + momentum * var * n / (n - 1)
    else:
        mean, var = sd[name + ".running_mean"], sd[name + ".running_var"]
    v = lambda t: t[None, :, None, None]  # noqa: E731
    return (x - v(mean)) / torch.sqrt(v(var) + 1e-5) * v(sd[name + ".weight"]) + v(sd[name + ".bias"])


def conv_by_hand(sd, name, x, stride, pad):
    return F.conv2d(F.pad(x, pad), sd[name + ".weight"], stride=stride)


def head_by_hand(out, sd, fc):
    return out.mean((2, 3)) @ sd[fc + ".weight"].T + sd[fc + ".bias"]


def preact_resnet18_by_hand(sd, x, train, stats, raw_shortcut):
    """Rice et al.'s PreActResNet-18, or ISEAT's (raw_shortcut: the downsampling 1x1 shortcut convolves the raw x)."""
    bn = lambda n, t: bn_by_hand(sd, n, t, train, 0.1, stats)  # noqa: E731
    h = conv_by_hand(sd, "conv1", x, 1, (1, 1, 1, 1))
    for layer in (1, 2, 3, 4):
        for j in (0, 1):
            p, s = f"layer{layer}.{j}.", 2 if layer > 1 and j == 0 else 1
            a = F.relu(bn(p + "bn1", h))
            short = conv_by_hand(sd, p + "shortcut.0", h if raw_shortcut else a, s, (0,) * 4) \
                if p + "shortcut.0.weight" in sd else h
            o = conv_by_hand(sd, p + "conv1", a, s, (1, 1, 1, 1))
            h = conv_by_hand(sd, p + "conv2", F.relu(bn(p + "bn2", o)), 1, (1, 1, 1, 1)) + short
    return head_by_hand(F.relu(bn("bn", h)), sd, "linear")


def iseat_wrn_by_hand(sd, x, train, stats, depth):
    """ISEAT's WideResNet: conv1 stride 1, conv2 the block's stride, the shortcut from the raw x; fc0."""
    bn = lambda n, t: bn_by_hand(sd, n, t, train, 0.1, stats)  # noqa: E731
    h = conv_by_hand(sd, "conv1", x, 1, (1, 1, 1, 1))
    for g, stride in ((1, 1), (2, 2), (3, 2)):
        for i in range((depth - 4) // 6):
            p, s = f"layer{g}.block{i}.", stride if i == 0 else 1
            o = conv_by_hand(sd, p + "conv1", F.relu(bn(p + "bn1", h)), 1, (1, 1, 1, 1))
            o = conv_by_hand(sd, p + "conv2", F.relu(bn(p + "bn2", o)), s, (1, 1, 1, 1))
            h = o + (conv_by_hand(sd, p + "shortcut.0", h, s, (0,) * 4) if p + "shortcut.0.weight" in sd else h)
    return head_by_hand(F.relu(bn("bn1", h)), sd, "fc0")


def silu_wrn_by_hand(sd, x, train, stats, depth, mean, std):
    """DM-Improves-AT's WideResNet: (x - mean) / std, SiLU, BatchNorm momentum 0.01, "same" padding of the strided
    convs (0 left/top, 1 right/bottom), the shortcut from the activated input where the width changes; logits."""
    bn = lambda n, t: bn_by_hand(sd, n, t, train, 0.01, stats)  # noqa: E731
    # the constants are float32 tensors, as released (not buffers there: .double() leaves them float32)
    x = (x - torch.tensor(mean).reshape(1, -1, 1, 1)) / torch.tensor(std).reshape(1, -1, 1, 1)
    h = conv_by_hand(sd, "init_conv", x, 1, (1, 1, 1, 1))
    for g, stride in ((0, 1), (1, 2), (2, 2)):
        for i in range((depth - 4) // 6):
            p, s = f"layer.{g}.block.{i}.", stride if i == 0 else 1
            a = F.silu(bn(p + "batchnorm_0", h))
            o = conv_by_hand(sd, p + "conv_0", a, s, (1, 1, 1, 1) if s == 1 else (0, 1, 0, 1))
            o = conv_by_hand(sd, p + "conv_1", F.silu(bn(p + "batchnorm_1", o)), 1, (1, 1, 1, 1))
            h = o + (conv_by_hand(sd, p + "shortcut", a, s, (0,) * 4) if p + "shortcut.weight" in sd else h)
    return head_by_hand(F.silu(bn("batchnorm", h)), sd, "logits")


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
AUTHORS_NETWORKS = {  # arch: (the slow reference, data set, classes, channels, image size)
    "preact_resnet18": (lambda sd, x, t, st: preact_resnet18_by_hand(sd, x, t, st, False), None, 10, 3, 16),
    "preact_resnet18_iseat": (lambda sd, x, t, st: preact_resnet18_by_hand(sd, x, t, st, True), None, 10, 3, 16),
    "wrn34_10_iseat": (lambda sd, x, t, st: iseat_wrn_by_hand(sd, x, t, st, 34), None, 10, 3, 8),
    "wrn28_10_iseat": (lambda sd, x, t, st: iseat_wrn_by_hand(sd, x, t, st, 28), None, 100, 3, 8),
    "wrn28_10_silu": (lambda sd, x, t, st: silu_wrn_by_hand(sd, x, t, st, 28, CIFAR10_MEAN, CIFAR10_STD),
                      "cifar10", 10, 3, 8),
    "wrn28_10_silu-cifar100": (lambda sd, x, t, st: silu_wrn_by_hand(sd, x, t, st, 28, CIFAR100_MEAN, CIFAR100_STD),
                               "cifar100", 100, 3, 8),
    "wrn28_10_silu-grey": (lambda sd, x, t, st: silu_wrn_by_hand(  # CIFAR-10's constants, averaged over the channels
        sd, x, t, st, 28, (torch.tensor(CIFAR10_MEAN).mean().item(),), (torch.tensor(CIFAR10_STD).mean().item(),)),
                           "fashion_mnist", 10, 1, 12),
    "wrn70_16_silu": (lambda sd, x, t, st: silu_wrn_by_hand(sd, x, t, st, 70, CIFAR10_MEAN, CIFAR10_STD),
                      "cifar10", 10, 3, 4),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "wrn70_16_silu" else n
                                  for n in AUTHORS_NETWORKS])
def test_authors_networks_compute_the_released_function(name):
    """Logits in eval and train mode, and the BatchNorm running statistics after the train-mode forward, equal the
    slow reference in float64 (random BatchNorm statistics and affine parameters, so that every one is used)."""
    by_hand, dataset, classes, channels, size = AUTHORS_NETWORKS[name]
    torch.manual_seed(0)
    m = models.get_model(name.split("-")[0], classes, channels, dataset=dataset).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                for t in (mod.weight, mod.bias, mod.running_mean):
                    t.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.rand(3, channels, size, size, dtype=torch.float64)
    with torch.no_grad():
        want = by_hand(sd, x, False, {})
        assert (m.eval()(x) - want).abs().max() <= 1e-9 * (1 + want.abs().max())
        stats = {}
        want = by_hand(sd, x, True, stats)
        got = m.train()(x)
    assert (got - want).abs().max() <= 1e-9 * (1 + want.abs().max())
    now = m.state_dict()
    assert stats and set(stats) == {k for k in sd if k.endswith(("running_mean", "running_var"))}
    for k, v in stats.items():
        assert (now[k] - v).abs().max() <= 1e-9 * (1 + v.abs().max()), k
    if name.startswith("preact"):  # the two PreActResNets differ where said: a swapped shortcut would fail here
        other = AUTHORS_NETWORKS["preact_resnet18" if name.endswith("iseat") else "preact_resnet18_iseat"][0]
        with torch.no_grad():
            assert (other(sd, x, False, {}) - m.eval()(x)).abs().max() > 1e-6


RELEASED_KEYS = {  # the first and last keys of each released state dict, as the authors' files name them
    "preact_resnet18_iseat": (["conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias"],
                              ["bn.num_batches_tracked", "linear.weight", "linear.bias"]),
    "wrn34_10_iseat": (["conv1.weight", "layer1.block0.bn1.weight", "layer1.block0.bn1.bias",
                        "layer1.block0.bn1.running_mean", "layer1.block0.bn1.running_var",
                        "layer1.block0.bn1.num_batches_tracked", "layer1.block0.conv1.weight"],
                       ["layer3.block4.conv2.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                        "bn1.running_var", "bn1.num_batches_tracked", "fc0.weight", "fc0.bias"]),
    "wrn28_10_iseat": (["conv1.weight", "layer1.block0.bn1.weight"], ["layer3.block3.conv2.weight", "bn1.weight",
                                                                      "bn1.bias", "bn1.running_mean",
                                                                      "bn1.running_var", "bn1.num_batches_tracked",
                                                                      "fc0.weight", "fc0.bias"]),
    "wrn28_10_silu": (["init_conv.weight", "layer.0.block.0.batchnorm_0.weight", "layer.0.block.0.batchnorm_0.bias",
                       "layer.0.block.0.batchnorm_0.running_mean", "layer.0.block.0.batchnorm_0.running_var",
                       "layer.0.block.0.batchnorm_0.num_batches_tracked", "layer.0.block.0.conv_0.weight"],
                      ["layer.2.block.3.conv_1.weight", "batchnorm.weight", "batchnorm.bias",
                       "batchnorm.running_mean", "batchnorm.running_var", "batchnorm.num_batches_tracked",
                       "logits.weight", "logits.bias"]),
    "wrn70_16_silu": (["init_conv.weight", "layer.0.block.0.batchnorm_0.weight"],
                      ["layer.2.block.10.conv_1.weight", "batchnorm.weight", "batchnorm.bias",
                       "batchnorm.running_mean", "batchnorm.running_var", "batchnorm.num_batches_tracked",
                       "logits.weight", "logits.bias"]),
}


def test_authors_networks_hold_the_released_keys_and_load_strictly():
    for arch, (first, last) in RELEASED_KEYS.items():
        keys = list(models.get_model(arch, 10).to("meta").state_dict())
        assert keys[:len(first)] == first and keys[-len(last):] == last, arch
        assert not any(k in ("mean", "std") for k in keys)  # the SiLU constants are not in the state dict
    for shortcut in ("layer1.block0.shortcut.0.weight", "layer2.block0.shortcut.0.weight"):
        assert shortcut in models.get_model("wrn34_10_iseat", 10).to("meta").state_dict()
    assert "layer1.block1.shortcut.0.weight" not in models.get_model("wrn34_10_iseat", 10).to("meta").state_dict()
    sd = models.get_model("wrn28_10_silu", 10).state_dict()
    assert "layer.1.block.0.shortcut.weight" in sd and "layer.1.block.1.shortcut.weight" not in sd
    # a RobustBench claim names every network as the boards do (Wang2023Better_WRN-28-10: "WideResNet-28-10")
    assert set(evaluate.ARCH_NAMES) == set(models.ARCHS) and evaluate.ARCH_NAMES["wrn28_10_silu"] == "WideResNet-28-10"
    assert evaluate.ARCH_NAMES["wrn70_16_silu"] == "WideResNet-70-16" and evaluate.ARCH_NAMES["wrn34_10_iseat"] == \
        "WideResNet-34-10"
    # DM-Improves-AT's file: {'model_state_dict': ...} with module.0. keys; loads strictly once eval.py strips them
    wrapped = {"module.0." + k: v for k, v in sd.items()}
    m = models.get_model("wrn28_10_silu", 10)
    m.load_state_dict(evaluate.clean_state_dict(wrapped), strict=True)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


def test_silu_networks_hold_their_data_sets_constants():
    for dataset, mean, std in (("cifar10", CIFAR10_MEAN, CIFAR10_STD), (None, CIFAR10_MEAN, CIFAR10_STD),
                               ("cifar100", CIFAR100_MEAN, CIFAR100_STD), ("svhn", (0.5,) * 3, (0.5,) * 3),
                               ("tiny_imagenet", CIFAR10_MEAN, CIFAR10_STD)):
        m = models.get_model("wrn28_10_silu", 10, 3, dataset=dataset)
        assert torch.allclose(m.mean.flatten(), torch.tensor(mean)) and torch.allclose(m.std.flatten(),
                                                                                      torch.tensor(std)), dataset
    m = models.get_model("wrn28_10_silu", 10, 1, dataset="mnist")
    assert m.mean.shape == (1, 1, 1, 1) and m.mean.item() == pytest.approx(sum(CIFAR10_MEAN) / 3)
    assert "mean" not in m.state_dict() and m.double().mean.dtype == torch.float64


@pytest.mark.parametrize("layout", ["iseat", "dm", "robustbench-bare", "robustbench-module"])
def test_eval_reads_the_authors_released_checkpoint_layouts(cifar, tmp_path, layout):
    """ISEAT's {'state_dict': bare keys}, DM-Improves-AT's {'model_state_dict': module.0. keys}, RobustBench's bare
    or module. keys (under state_dict or not); the result equals the network's own accuracy, and a wrong --arch is
    refused in one line."""
    root, _ = cifar
    arch = "preact_resnet18_iseat" if layout == "iseat" else "wrn28_10_silu"
    torch.manual_seed(0)
    model = models.get_model(arch, 10, dataset="cifar10").eval()
    sd = model.state_dict()
    ck = {"iseat": {"state_dict": sd}, "dm": {"model_state_dict": {"module.0." + k: v for k, v in sd.items()}},
          "robustbench-bare": sd, "robustbench-module": {"state_dict": {"module." + k: v for k, v in sd.items()}}}
    path = str(tmp_path / f"{layout}.pt")
    torch.save(ck[layout], path)
    res = ev([path, "--arch", arch, "--dataset", "cifar10", "--data-dir", root, "--attacks", "clean",
              "--n-examples", "4", "--batch-size", "4"])
    with torch.no_grad():
        ds = data.load("cifar10", root, val_size=0)
        want = (model(ds["test_x"][:4].float() / 255).argmax(1) == ds["test_y"][:4]).float().mean().item() * 100
    assert res[path]["ran"]["clean"]["accuracy"] == pytest.approx(want)
    other = "preact_resnet18" if layout == "iseat" else "wrn28_10_iseat"
    if layout != "iseat":  # ISEAT's PreActResNet has Rice et al.'s keys: only its function differs
        with pytest.raises(SystemExit, match=f"does not fit arch '{other}'.*pass the --arch and --dataset"):
            ev([path, "--arch", other, "--dataset", "cifar10", "--data-dir", root, "--attacks", "clean",
                "--n-examples", "4"])


# The authors' WideResNets at depth 10, width 1 (the same classes, blocks and key pattern): what the method files
# do with a network does not depend on its size, and the full sizes take minutes a batch on a CPU.
SMALL_AUTHORS_NETWORKS = {
    "wrn34_10_iseat": lambda n, c, d: models.IseatWideResNet(10, 1, n, c),
    "wrn28_10_iseat": lambda n, c, d: models.IseatWideResNet(10, 2, n, c),
    "wrn28_10_silu": lambda n, c, d: models.SiluWideResNet(10, 1, n, c, d),
    "wrn70_16_silu": lambda n, c, d: models.SiluWideResNet(10, 2, n, c, d),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["preact_resnet18_iseat", "wrn34_10_iseat", "wrn28_10_iseat", "wrn28_10_silu",
                                  "wrn70_16_silu"])
def test_every_method_trains_on_the_authors_networks(cifar, tmp_path, monkeypatch, arch):
    """Each method, one process, on each of the authors' networks: --amp, --wa, --save-every, a resume, --compile
    (at.py, SiLU); eval.py reads the checkpoint and builds the same network (the SiLU one with CIFAR-10's
    constants)."""
    monkeypatch.setattr(models, "ARCHS", {**models.ARCHS, **SMALL_AUTHORS_NETWORKS})
    root, _ = cifar
    common = ["--dataset", "cifar10", "--data-dir", root, "--arch", arch, "--batch-size", "4", "--max-batches", "1",
              "--steps", "1", "--val-size", "4", "--val-steps", "1", "--milestones", "1", "--save-every", "1",
              "--device", DEV]
    methods = ["at", "sar", "iseat", "trades", "mart"]
    resumed = methods[list(SMALL_AUTHORS_NETWORKS).index(arch) + 1 if arch in SMALL_AUTHORS_NETWORKS else 0]
    for name in methods:
        out = str(tmp_path / name)
        sys.modules[name].main(common + ["--epochs", "1", "--wa", "--out", out] +
                                          (["--amp"] if name == resumed else []) +
                                          (["--compile"] if (name, arch) == ("at", "wrn28_10_silu") else []))
        assert os.path.exists(os.path.join(out, "epoch_1.pt"))
        if name == resumed:
            sys.modules[name].main(common + ["--epochs", "2", "--wa", "--amp", "--resume", "--out", out])
            assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 2
    ck = os.path.join(str(tmp_path / resumed), "last.pt")
    res = ev([ck, "--attacks", "clean", "--n-examples", "4"])
    assert res[ck]["ran"]["clean"]["n_examples"] == 4
    if "silu" in arch:
        assert torch.equal(evaluate.load_model(ck, evaluate.get_args([ck]), "cpu")[0].mean.flatten(),
                           torch.tensor(CIFAR10_MEAN))


# ---------------------------------------------------------------- training, checkpoints, resume, evaluation

def at_args(root, out, *extra):
    return ["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "3", "--milestones", "2",
            "--batch-size", "32", "--val-size", "40", "--out", str(out), "--device", DEV, *extra]


@pytest.mark.slow
def test_at_trains_logs_checkpoints_and_eval_reads_them(cifar, tmp_path):
    root, _ = cifar
    out = tmp_path / "run"
    at.main(at_args(root, out, "--wa", "--wa-mode", "swa"))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert [round(r["lr"], 6) for r in log] == [0.1, 0.1, 0.01]
    for r in log:
        assert 0 <= r["val_pgd"] <= r["val_clean"] <= 100 and r["img_per_s"] > 0
    assert log[0]["wa_val_pgd"] is None and log[2]["wa_val_pgd"] is not None  # SWA starts at the milestone
    for name in ("last.pt", "best.pt", "wa_best.pt"):
        ck = torch.load(out / name, weights_only=True)
        assert ck["format"] == models.CKPT_FORMAT and ck["arch"] == "cnn" and ck["args"]["epochs"] == 3
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metrics"]["val_pgd"] == max(r["val_pgd"] for r in log)
    res = ev([str(out / "last.pt"), "--attacks", "clean", "fgsm", "pgd", "cw", "aa", "--n-examples", "12",
              "--batch-size", "12"])
    r = res[str(out / "last.pt")]["ran"]
    assert r["aa"]["accuracy"] <= r["clean"]["accuracy"] and r["worst"]["accuracy"] <= r["pgd"]["accuracy"]
    assert r["worst"]["accuracy"] <= min(r[a]["accuracy"] for a in ("fgsm", "pgd", "cw", "aa"))
    assert "PGD-20 (Linf, eps 8/255, step 2/255" in r["pgd"]["attack"] and "CW-30" in r["cw"]["attack"]
    assert r["fgsm"]["attack"].startswith("FGSM (Linf, eps 8/255")
    saved = json.load(open(out / "last.eval.json"))
    pgd_saved = [e for e in saved["results"].values() if e["name"] == "pgd"]
    assert len(pgd_saved) == 1 and pgd_saved[0]["accuracy"] == r["pgd"]["accuracy"]
    assert pgd_saved[0]["n_examples"] == 12 and pgd_saved[0]["date"] and pgd_saved[0]["seed"] == 0
    # the WA weights: from last.pt with --weights wa, and wa_best.pt holds them as its model
    ev([str(out / "last.pt"), "--weights", "wa", "--attacks", "clean", "--n-examples", "8"])
    assert os.path.exists(out / "last.wa.eval.json")
    wa_best = torch.load(out / "wa_best.pt", weights_only=True)
    assert wa_best["weights"] == "wa"


def test_eval_reads_bare_state_dicts_of_other_projects(cifar, tmp_path):
    root, _ = cifar
    model = models.get_model("cnn", 10)
    sd = {"module." + k: v for k, v in model.state_dict().items()}  # DataParallel prefix
    sd["n_averaged"] = torch.tensor(3)
    sd["sub_block1.layer.0.conv1.weight"] = torch.zeros(1)  # the unused TRADES block
    torch.save({"state_dict": sd}, tmp_path / "other.pth")
    res = ev([str(tmp_path / "other.pth"), "--arch", "cnn", "--dataset", "cifar10", "--data-dir", root,
              "--attacks", "clean", "--n-examples", "8"])
    model.eval()
    with torch.no_grad():
        ds = data.load("cifar10", root, val_size=0)
        want = (model(ds["test_x"][:8].float() / 255).argmax(1) == ds["test_y"][:8]).float().mean().item() * 100
    assert res[str(tmp_path / "other.pth")]["ran"]["clean"]["accuracy"] == pytest.approx(want)


def final_state(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def assert_same_run(a, b):
    for key in ("model", "wa_model"):
        for k in a[key]:
            assert same(a[key][k], b[key][k]), (key, k)
    for k, s in a["optimizer"]["state"].items():
        assert same(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["wa_n"] == b["wa_n"] and (ON_CUDA or a["best"] == b["best"])


def kill_and_resume(root, out, monkeypatch, owner, name, dying):
    """Runs at.py with owner.name replaced by dying(real), which raises KeyboardInterrupt somewhere in epoch 3;
    then resumes with the real one."""
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, dying(real))
    with pytest.raises(KeyboardInterrupt):
        at.main(at_args(root, out, "--wa"))
    monkeypatch.setattr(owner, name, real)
    assert final_state(out)["epoch"] == 2
    at.main(at_args(root, out, "--wa", "--resume"))


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    ref = tmp_path / "ref"
    at.main(at_args(root, ref, "--wa"))
    ref_log = [json.loads(line) for line in open(ref / "log.jsonl")]

    def dying_pgd(real):
        # killed in the middle of the third epoch: the 15th training attack is the 5th batch of epoch 3, after two
        # epochs of 5 training batches
        calls = []

        def pgd(*a, **k):
            calls.append(1)
            if len(calls) == 15:
                raise KeyboardInterrupt
            return real(*a, **k)
        return pgd

    kill_and_resume(root, tmp_path / "killed", monkeypatch, at, "pgd", dying_pgd)
    assert_same_run(final_state(ref), final_state(tmp_path / "killed"))
    log = [json.loads(line) for line in open(tmp_path / "killed" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2, 3] and log[-1]["val_pgd"] == ref_log[-1]["val_pgd"]

    def dying_save(real):
        # killed while writing last.pt at the end of epoch 3: the old last.pt survives intact
        def save(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("epoch") == 3 and "optimizer" in obj:
                f.write(b"partial")
                raise KeyboardInterrupt
            return real(obj, f, *a, **k)
        return save

    kill_and_resume(root, tmp_path / "killed_in_save", monkeypatch, torch, "save", dying_save)
    assert_same_run(final_state(ref), final_state(tmp_path / "killed_in_save"))


def test_amp_training_runs(cifar, tmp_path):
    root, _ = cifar
    at.main(at_args(root, tmp_path / "amp", "--amp", "--epochs", "1", "--milestones", "--max-batches", "2"))
    assert final_state(tmp_path / "amp")["epoch"] == 1


# ---------------------------------------------------------------- natural training and real images

def test_natural_training_says_so_and_runs_no_attack(cifar, tmp_path, monkeypatch, capsys):
    root, _ = cifar
    calls = []
    real = attacks.pgd
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: calls.append(1) or real(*a, **k))
    for module in (at, sar, iseat):
        monkeypatch.setattr(module, "pgd", lambda *a, **k: calls.append(1) or real(*a, **k))
    for module in (at, sar, iseat, trades, mart):
        out = tmp_path / module.__name__
        module.main(at_args(root, out, "--eps", "0", "--epochs", "2", "--milestones", "1", "--max-batches", "2"))
        printed = capsys.readouterr().out
        assert "natural training (no attack)" in printed and "PGD-" not in printed.split("\n")[0], module
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        assert all(r["val_pgd"] is None and r["val_clean"] is not None for r in log)
        best = torch.load(out / "best.pt", weights_only=True)  # chosen on clean accuracy
        assert best["metrics"]["val_clean"] == max(r["val_clean"] for r in log)
    assert calls == []  # neither the training attack nor validation PGD ran
    res = ev([str(tmp_path / "at" / "best.pt"), "--attacks", "clean", "--n-examples", "8"])
    assert res[str(tmp_path / "at" / "best.pt")]["method"] == "natural"  # not "at": it saw no attack


needs_fmnist = pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f"no Fashion-MNIST files in {FMNIST} "
                                  "(apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fmnist_runs(tmp_path_factory):
    """Real Fashion-MNIST images, the small CNN: natural training and PGD-AT (eps 0.1) on a few thousand images."""
    root = tmp_path_factory.mktemp("fmnist")
    common = ["--dataset", "fashion_mnist", "--data-dir", FMNIST, "--arch", "cnn", "--epochs", "2",
              "--milestones", "1", "--val-size", "500", "--device", DEV]
    at.main(common + ["--eps", "0", "--max-batches", "40", "--out", str(root / "natural")])  # 10,240 images
    at.main(common + ["--eps", "0.1", "--alpha", "0.025", "--steps", "5", "--max-batches", "20",
                      "--out", str(root / "at")])  # 5,120 images
    return root


@needs_fmnist
@pytest.mark.slow
def test_adversarial_training_buys_robustness_on_real_images(fmnist_runs, capsys):
    """What adversarial training is for: the AT model keeps far more of its accuracy under PGD-20."""
    nat_ck, at_ck = str(fmnist_runs / "natural" / "last.pt"), str(fmnist_runs / "at" / "last.pt")
    res = ev([nat_ck, at_ck, "--attacks", "clean", "pgd", "--eps", "0.1", "--n-examples", "500"])
    nat, adv = res[nat_ck]["ran"], res[at_ck]["ran"]
    print(f"natural: clean {nat['clean']['accuracy']:.1f} %, PGD-20 {nat['pgd']['accuracy']:.1f} %; "
          f"AT: clean {adv['clean']['accuracy']:.1f} %, PGD-20 {adv['pgd']['accuracy']:.1f} %", file=sys.stderr)
    assert nat["pgd"]["attack"] == "PGD-20 (Linf, eps 0.1, step 0.025, random start, 1 restart)"
    assert nat["clean"]["accuracy"] > 40 and adv["clean"]["accuracy"] > 40  # chance is 10 %
    assert nat["pgd"]["accuracy"] < 12  # a naturally trained model is not robust
    assert adv["pgd"]["accuracy"] > nat["pgd"]["accuracy"] + 20 and adv["pgd"]["accuracy"] > 25


class Saturated(nn.Module):
    """Gradient masking by a saturated softmax: the logits times 10^4. The CE gradient is exactly zero in fp32
    wherever the model is confident; the margin's is not."""
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x) * 1e4


class Quantised(nn.Module):
    """Gradient masking by a non-differentiable input stage: pixels rounded to 9 levels, the input gradient is zero
    everywhere, yet a perturbation of 0.1 moves pixels across levels."""
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(torch.round(x * 8) / 8)


class Noisy(nn.Module):
    """A randomised model: Gaussian noise (sigma 0.1) on the input at every pass."""
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x + 0.1 * torch.randn_like(x))


@needs_fmnist
@pytest.mark.slow
def test_checks_warn_on_masked_models_and_pass_honest_ones(fmnist_runs, tmp_path, monkeypatch, capsys):
    """eval.py --checks on the honest natural and PGD-AT models (every check passes) and on three deliberately
    masked versions of the natural model, each of which must raise the WARNs of its kind of masking, and not the
    others'."""
    import report
    flags = ["--eps", "0.1", "--attacks", "clean", "pgd", "--n-examples", "200", "--checks", "--square-queries", "500",
             "--pgd-steps", "10", "--cw-steps", "10"]
    nat_ck, at_ck = str(fmnist_runs / "natural" / "best.pt"), str(fmnist_runs / "at" / "best.pt")
    res = ev([nat_ck, at_ck] + flags)
    out = capsys.readouterr().out
    for ck in (nat_ck, at_ck):
        assert res[ck]["ran"]["checks"]["warned"] == [], out
    assert out.count("all checks pass") == 2 and "PASS  6. white box vs black box" in out
    # the curve: one picture for both runs, in the report folder beside them; its numbers in the JSON
    png = fmnist_runs / "report" / "curve.png"
    assert f"robustness curve: {png}" in out and png.stat().st_size > 10000
    curve = res[at_ck]["ran"]["curve"]
    assert curve["radii"] == pytest.approx([0, 0.025, 0.05, 0.1, 0.2, 0.4])
    assert curve["pgd"][3] == res[at_ck]["ran"]["pgd"]["accuracy"]  # the curve at eps is eval.py's own PGD
    assert curve["pgd"][0] == curve["cw"][0] == res[at_ck]["ran"]["clean"]["accuracy"]
    assert curve["pgd"][1] > curve["pgd"][3] > curve["pgd"][5]
    rows = report.main([str(fmnist_runs / "natural"), str(fmnist_runs / "at"), "--out", str(tmp_path / "rep")])
    assert [r["checks"]["warned"] for r in rows if r["checkpoint"] == "best"] == [[], []]
    assert "all 8 pass (200 images)" in (tmp_path / "rep" / "report.md").read_text()
    # the masked models (eval.py's loader wraps the natural model)
    real = evaluate.load_model
    expect = {Saturated: ({"margin vs cross-entropy", "unbounded attack", "gradients"}, {"determinism"}),
              Quantised: ({"unbounded attack", "white box vs black box", "gradients"},
                          {"margin vs cross-entropy", "determinism"}),
              Noisy: ({"determinism"}, {"gradients", "unbounded attack"})}
    for wrapper, (must, must_not) in expect.items():
        monkeypatch.setattr(evaluate, "load_model", lambda *a: (wrapper(real(*a)[0]).eval(), real(*a)[1]))
        got = ev([nat_ck, "--results-dir", str(tmp_path / wrapper.__name__)] + flags)[nat_ck]["ran"]["checks"]
        out = capsys.readouterr().out
        print(wrapper.__name__, got["warned"], file=sys.stderr)
        assert must <= set(got["warned"]) and not must_not & set(got["warned"]), out
        for v in got["checks"]:  # every WARN says what to do
            assert v["status"] == "PASS" or ": " in v["text"].split(" %")[-1] or "EOT" in v["text"]
        if wrapper is Noisy:  # a randomised model: eval.py names the attack to use
            assert "--attacks aa-rand" in next(v["text"] for v in got["checks"] if v["check"] == "determinism")


def honest_flags(n=100):
    """Per-image results of a model every check passes: 50 of 100 images robust to every attack at eps."""
    first = lambda k: torch.arange(n) < k  # noqa: E731
    pgd = first(50)
    return dict(clean=first(n), pgd=pgd, cw=pgd.clone(), fgsm=first(60), strong=pgd.clone(), unbounded=first(0),
                whitebox=pgd.clone(), square=pgd.clone(), zero_ce=first(0), zero_cw=first(0),
                curve_pgd=[first(n), first(80), first(60), pgd, first(20), first(0)],
                curve_cw=[first(n), first(80), first(60), pgd, first(20), first(0)], passes=(0.0, 10.0, 0),
                norm="Linf", eps=0.1, unbounded_eps=0.5, radii=[0, 0.025, 0.05, 0.1, 0.2, 0.4],
                labels={k: k.upper() for k in ("pgd", "cw", "fgsm", "strong", "unbounded", "square")})


def test_check_thresholds_follow_the_stated_rule():
    """A gap g (points) between two results on n images WARNs only when g > the check's margin and g > 2 * 100 *
    sqrt(d) / n, d the images the two disagree on. Worked by hand at n = 100 (2 SE = 2 sqrt(d)), and against the
    rule computed image by image on random results."""
    import checks
    first = lambda k: torch.arange(100) < k  # noqa: E731

    def warned(**change):
        return {v["check"] for v in checks.verdicts({**honest_flags(), **change}, 100) if v["status"] == "WARN"}
    assert warned() == set()
    assert warned(cw=first(44)) == {"margin vs cross-entropy"}  # g 6 > 5, d 6: 2 SE 4.9
    assert warned(cw=first(45)) == set()  # g 5: not above the margin
    assert warned(cw=first(42) | (torch.arange(100) // 2 == 25)) == set()  # g 6, d 10: 2 SE 6.3
    assert warned(strong=first(45)) == {"convergence"}  # g 5 > 2, d 5: 2 SE 4.5
    assert warned(strong=first(46)) == set()  # g 4, d 4: 2 SE 4.0, not above it
    assert warned(fgsm=first(45)) == {"one step vs many"}  # FGSM 5 points below PGD, 2 SE 4.5
    assert warned(fgsm=first(50)) == set()
    assert warned(unbounded=first(5)) == {"unbounded attack"} and warned(unbounded=first(4)) == set()
    assert warned(square=first(45)) == {"white box vs black box"} and warned(square=first(46)) == set()
    assert warned(zero_ce=first(5)) == {"gradients"} and warned(zero_cw=first(4)) == set()
    rise = [first(100), first(80), first(60), first(50), first(56), first(0)]  # 6 points up from eps to 2 eps
    assert warned(curve_cw=rise) == {"monotone in the radius"}
    assert warned(curve_pgd=rise[:4] + [first(54), first(0)]) == set()  # 4 points, d 4
    assert warned(passes=(1e-3, 10.0, 0)) == set()  # within 1e-4 * (1 + largest |logit|)
    assert warned(passes=(2e-3, 10.0, 0)) == {"determinism"} and warned(passes=(0.0, 10.0, 1)) == {"determinism"}
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # random paired results against the rule, image by image
        n = int(torch.randint(20, 300, (1,), generator=g))
        p = (torch.rand(n, generator=g) < 0.6).tolist()
        c = [a if torch.rand(1, generator=g) < 0.9 else not a for a in p]
        base = honest_flags(n)
        got = checks.verdicts({**base, "pgd": torch.tensor(p), "cw": torch.tensor(c)}, n)[0]
        gap = 100 * (sum(p) - sum(c)) / n
        d = sum(a != b for a, b in zip(p, c))
        assert (got["status"] == "WARN") == (gap > 5 and gap > 2 * 100 * d ** 0.5 / n)
        assert got["numbers"]["disagree"] == d and abs(got["gap"] - gap) < 1e-3


@pytest.mark.slow
def test_checks_numbers_are_the_attacks_own_and_are_kept(tmp_path, monkeypatch, capsys):
    """Every number of eval.py --checks is the stored result of an attack on the same images, recomputed here
    slowly: each PGD / CW restart on all images from the chunk's own seed, Square on the images every white-box
    attack left robust, the zero gradients image by image, two passes; a second run computes nothing, and a run
    killed in Square continues there."""
    import zlib
    import checks
    run = tmp_path / "run"
    at.main(["--dataset", "synthetic", "--arch", "cnn", "--epochs", "1", "--batch-size", "64", "--max-batches", "20",
             "--val-size", "50", "--eps", "0", "--out", str(run), "--device", DEV])  # 2/3 right, 1/2 robust at 2/255
    ck = str(run / "best.pt")
    flags = ["--eps", "2/255", "--n-examples", "48", "--batch-size", "12", "--checks-n", "24", "--checks",
             "--square-queries", "40", "--pgd-steps", "3", "--cw-steps", "3"]
    got = ev([ck, "--attacks", "clean", "pgd"] + flags)[ck]["ran"]
    store = torch.load(run / "best.eval.pt", weights_only=True)["attacks"]
    model, _ = evaluate.load_model(ck, evaluate.get_args([ck]), torch.device(DEV))
    ds = data.load("synthetic", "data", val_size=0, device=torch.device(DEV))
    x, y = ds["test_x"][:24].float() / 255, ds["test_y"][:24]
    by_desc = {e["attack"]: e for k, e in store.items() if e["n_examples"] == 24}
    # PGD-3 at eps on the first 24 images was taken from the run on 48 (its first two chunks), not run again
    pgd_desc = attacks.describe("pgd", 2 / 255, 0.5 / 255, 3)
    assert by_desc[pgd_desc]["taken_from"] == "the first 24 of its 48 images"
    slow = {}
    for desc, e in by_desc.items():
        s = e["spec"]
        if s["name"] not in ("pgd", "cw", "fgsm"):
            continue
        ok = []
        for c in range(2):
            torch.manual_seed(zlib.crc32(s["name"].encode()) + c)
            xb, yb = x[12 * c:12 * c + 12], y[12 * c:12 * c + 12]
            hit = torch.ones(12, dtype=torch.bool, device=yb.device)
            with attacks.frozen(model):
                for _ in range(s["restarts"] if s["name"] != "fgsm" else 1):
                    if s["name"] == "fgsm":
                        adv = evaluate.fgsm(model, xb, yb, s["eps"])
                    else:
                        u = torch.rand(xb.shape, device=xb.device)
                        adv = attacks.pgd(model, xb, yb, s["eps"], s["alpha"], s["steps"], loss=s["name"].replace(
                            "pgd", "ce"), noise=u)
                    with torch.no_grad():
                        hit &= model(adv).argmax(1) == yb
            ok.append(hit.cpu())
        slow[desc] = torch.cat(ok)
        assert torch.equal(slow[desc], e["correct"]), desc
    strong = [d for d in slow if "5 restarts" in d]
    assert strong == [attacks.describe("pgd", 2 / 255, 0.1 / 255, 15, restarts=5)]
    verdict = {v["check"]: v for v in got["checks"]["checks"]}
    acc = lambda t: 100 * t.float().mean().item()  # noqa: E731
    assert verdict["convergence"]["numbers"]["strong"] == pytest.approx(acc(slow[strong[0]]))
    assert verdict["margin vs cross-entropy"]["numbers"]["cw"] == pytest.approx(
        acc(slow[attacks.describe("cw", 2 / 255, 0.5 / 255, 3)]))
    assert verdict["unbounded attack"]["numbers"]["unbounded"] == pytest.approx(
        acc(slow[attacks.describe("pgd", 0.5, 0.125, 3)]))
    assert verdict["monotone in the radius"]["numbers"]["pgd"] == pytest.approx(got["curve"]["pgd"], abs=1e-3)
    # Square: on the images every white-box attack at eps left robust, chunk by chunk with AutoAttack's seed
    clean = store["clean|n=24"]["correct"]  # keyed by the attack's settings
    wb = clean & torch.stack([t for d, t in slow.items() if "eps 2/255" in d]).all(0)
    broken = 0
    for c in range(2):
        idx = wb[12 * c:12 * c + 12].nonzero()[:, 0] + 12 * c
        if len(idx):
            broken += int((~evaluate.square(model, x[idx.to(x.device)], y[idx.to(x.device)], 2 / 255, "Linf", 40,
                                           0).cpu()).sum())
    assert verdict["white box vs black box"]["numbers"] == dict(whitebox_robust=int(wb.sum()), broken=broken)
    # zero input gradients, image by image
    zero = {"ce": 0, "cw": 0}
    for i in range(24):
        xi = x[i:i + 1].clone().requires_grad_(True)
        z = model(xi)
        for name, loss in (("ce", F.cross_entropy(z, y[i:i + 1])), ("cw", attacks.cw_loss(z, y[i:i + 1]).sum())):
            zero[name] += int(torch.autograd.grad(loss, xi, retain_graph=True)[0].abs().max() == 0)
    assert verdict["gradients"]["numbers"] == dict(zero_ce=zero["ce"], zero_cw=zero["cw"])
    assert verdict["determinism"]["numbers"]["changed"] == 0
    # stored in the JSON under their own keys; a second run attacks nothing and says the same
    record = json.load(open(run / "best.eval.json"))
    assert list(record["checks"]) == ["checks (Linf, eps 2/255) | first 24 test images | seed 0"]
    assert list(record["curve"]) == ["curve (Linf, eps 2/255) | first 24 test images | seed 0"]
    key = "checks (Linf, eps 2/255) | first 24 test images | seed 0"
    assert record["checks"][key]["warned"] == got["checks"]["warned"]
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: pytest.fail("attacked again"))
    monkeypatch.setattr(evaluate, "square", lambda *a, **k: pytest.fail("attacked again"))
    again = ev([ck, "--attacks"] + flags)[ck]["ran"]["checks"]
    assert [v["status"] for v in again["checks"]] == [v["status"] for v in got["checks"]["checks"]]
    assert [v["numbers"] for v in again["checks"][:7]] == [v["numbers"] for v in got["checks"]["checks"][:7]]
    # killed inside Square: the rerun attacks only with Square, and ends with the uninterrupted run's numbers
    monkeypatch.undo()
    monkeypatch.setattr(evaluate, "square", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ev([ck, "--attacks", "--results-dir", str(tmp_path / "killed")] + flags)
    monkeypatch.undo()
    real_pgd, calls = attacks.pgd, []
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: calls.append(1) or real_pgd(*a, **k))
    resumed = ev([ck, "--attacks", "--results-dir", str(tmp_path / "killed")] + flags)[ck]["ran"]["checks"]
    assert calls == []
    assert [v["numbers"] for v in resumed["checks"][:7]] == [v["numbers"] for v in got["checks"]["checks"][:7]]
    # --redo runs every attack once, though the checks share the ones asked for
    seen, real_chunk = [], evaluate.chunk_correct
    monkeypatch.setattr(evaluate, "chunk_correct", lambda m, s, xb, *a, **k: seen.append(
        (str(s), float(xb.float().sum()))) or real_chunk(m, s, xb, *a, **k))
    ev([ck, "--attacks", "clean", "pgd", "--redo"] + flags)
    assert len(seen) == len(set(seen)) and len({s for s, _ in seen}) == 15  # clean, PGD, FGSM, 5 + 5 curve, 3 more


# ---------------------------------------------------------------- nothing lost, nothing mislabelled

def stored(json_path):
    with open(json_path) as f:
        return json.load(f)["results"]


def by_name(results, name, n=None):
    return [r for r in results.values() if r["name"] == name and (n is None or r["n_examples"] == n)]


def test_eval_keeps_results_resumes_after_a_kill_and_never_mixes_checkpoints(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"  # a model that classifies well: the synthetic set is learnt in a few batches
    at.main(["--dataset", "synthetic", "--arch", "cnn", "--epochs", "1", "--batch-size", "64", "--max-batches", "6",
             "--val-size", "50", "--eps", "0", "--out", str(run), "--device", DEV])
    ck = str(run / "best.pt")
    ref_states, resumed_states = {}, {}
    real_chunk = evaluate.chunk_correct

    def recording_chunk(states):  # the random state each chunk starts from, by (attack, chunk)
        def chunk(model, s, xb, yb, args, **kw):
            rng = torch.get_rng_state().numpy().tobytes() + (torch.cuda.get_rng_state().numpy().tobytes()
                                                             if ON_CUDA else b"")
            states[(s["name"], round(xb.float().sum().item()))] = hashlib.md5(rng).hexdigest()
            return real_chunk(model, s, xb, yb, args, **kw)
        return chunk
    monkeypatch.setattr(evaluate, "chunk_correct", recording_chunk(ref_states))
    cmd = [ck, "--attacks", "clean", "fgsm", "pgd", "cw", "--n-examples", "48", "--batch-size", "12",
           "--pgd-steps", "3", "--cw-steps", "3"]
    ref = ev(cmd + ["--results-dir", str(tmp_path / "ref")])[ck]["ran"]
    monkeypatch.setattr(evaluate, "chunk_correct", real_chunk)
    ref_store = torch.load(tmp_path / "ref" / "run" / "best.eval.pt", weights_only=True)
    assert os.path.exists(tmp_path / "ref" / "run" / "best.eval.json") and not os.path.exists(run / "best.eval.json")
    # killed in the third of four PGD chunks: FGSM's 4 chunks are calls 1-4, PGD's are 5, 6, 7, ...
    real, calls = attacks.pgd, []

    def dying(*a, **k):
        calls.append(k.get("steps"))
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(attacks, "pgd", dying)
    with pytest.raises(KeyboardInterrupt):
        ev(cmd)
    monkeypatch.setattr(attacks, "pgd", real)
    err = capsys.readouterr().err
    assert "FGSM (Linf, eps 8/255, one step of size eps, no random start): 48/48 images" in err  # progress lines
    assert "PGD-3 (Linf, eps 8/255, step 2/255, random start, 1 restart): 24/48 images" in err
    # what finished before the kill is on disk: clean and FGSM results, and PGD's first two chunks
    res = stored(run / "best.eval.json")
    assert {r["name"] for r in res.values()} == {"clean", "fgsm"}
    part = torch.load(run / "best.eval.pt", weights_only=True)["attacks"]
    (pgd_part,) = [e for e in part.values() if e["name"] == "pgd"]
    assert pgd_part["done"].tolist() == [True, True, False, False]
    assert not glob_tmp(run)
    # the same command again continues where it stopped: only PGD's last two chunks and CW run
    calls.clear()
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: calls.append(k.get("steps")) or real(*a, **k))
    monkeypatch.setattr(evaluate, "chunk_correct", recording_chunk(resumed_states))
    out = ev(cmd)[ck]["ran"]
    monkeypatch.setattr(evaluate, "chunk_correct", real_chunk)
    monkeypatch.setattr(attacks, "pgd", real)
    assert calls == [3, 3] + [3] * 4
    assert "(stored " in capsys.readouterr().out  # clean and FGSM were not run again
    for name in ("clean", "fgsm", "pgd", "cw", "worst"):
        assert out[name]["accuracy"] == ref[name]["accuracy"], name  # the numbers of an uninterrupted run
    store = torch.load(run / "best.eval.pt", weights_only=True)["attacks"]
    for key, e in ref_store["attacks"].items():
        assert torch.equal(store[key]["correct"], e["correct"]), key  # per image, too
    assert "worst case over: clean, FGSM, PGD-3, CW-3" in out["worst"]["attack"]
    # and each chunk the resumed run attacked started from the random state it had in the uninterrupted run
    assert resumed_states and all(ref_states[k] == v for k, v in resumed_states.items())
    # a later run of other analyses, or of fewer images, adds to the record and removes nothing
    ev([ck, "--attacks", "--lowpass", "--spectrum", "--n-examples", "12", "--pgd-steps", "2"])
    ev([ck, "--attacks", "pgd", "--n-examples", "24", "--batch-size", "12", "--pgd-steps", "3"])
    rec = json.load(open(run / "best.eval.json"))
    assert len(by_name(rec["results"], "pgd", 48)) == 1 and len(by_name(rec["results"], "pgd", 24)) == 1
    assert by_name(rec["results"], "pgd", 48)[0]["accuracy"] == ref["pgd"]["accuracy"]
    assert len(by_name(rec["results"], "cw", 48)) == 1 and rec["lowpass"] and rec["spectrum"]
    for r in rec["results"].values():
        assert r["date"] and r["n_examples"] and r["attack"]
    # --redo runs a stored attack again (same settings, same seed: the same numbers)
    again = ev(cmd[:1] + ["--attacks", "fgsm", "--n-examples", "48", "--batch-size", "12", "--redo"])[ck]["ran"]
    assert again["fgsm"]["accuracy"] == ref["fgsm"]["accuracy"]
    # results whose per-image file is gone (or that an older eval.py wrote) are kept too
    os.remove(run / "best.eval.pt")
    ev([ck, "--attacks", "clean", "--n-examples", "8"])
    assert by_name(stored(run / "best.eval.json"), "cw", 48) and by_name(stored(run / "best.eval.json"), "clean", 8)
    # the checkpoint file changes (a newer best.pt): its old results are moved aside, never mixed with the new
    state = torch.load(ck, weights_only=True)
    state["epoch"] = 7
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, ck)
    ev([ck, "--attacks", "clean", "--n-examples", "48"])
    assert {r["name"] for r in stored(run / "best.eval.json").values()} == {"clean"}
    moved = [p for p in os.listdir(run) if p.startswith("best.eval.epoch1-")]
    assert sorted(p.rsplit(".", 1)[1] for p in moved) == ["json", "pt"]
    assert by_name(stored(run / [p for p in moved if p.endswith("json")][0]), "cw")
    # results that cannot be written are found before any attack runs; --results-dir writes them elsewhere
    (tmp_path / "a_file").write_text("")
    calls.clear()
    monkeypatch.setattr(attacks, "correct", lambda *a, **k: calls.append(1))
    one_line_error(ev, ck, "--results-dir", str(tmp_path / "a_file" / "sub"),
                   match=r"cannot write to .*a_file/sub/run .* pass --results-dir to a writable folder")
    one_line_error(ev, ck, "--spectrum", "--spectrum-out", str(tmp_path / "a_file" / "x.png"),
                   match=r"cannot write to .*a_file .* pass --spectrum-out")
    assert calls == []


def glob_tmp(folder):
    return [p for p in os.listdir(folder) if ".tmp" in p]


def test_files_written_before_the_structural_keys_still_load_and_resume(cifar, tmp_path, monkeypatch):
    """Results as eval.py wrote them until 2026-12 (.eval.pt and .eval.json keyed by the attacks' descriptions, one
    attack killed half-way) and a last.pt from before --recipe: eval.py resumes the killed attack, recomputes
    nothing that was done and lists each attack once; the training run resumes."""
    root, _ = cifar
    out = tmp_path / "run"
    at.main(at_args(root, out, "--epochs", "1", "--milestones", "--max-batches", "1"))
    ck = str(out / "last.pt")
    flags = ["--attacks", "clean", "pgd", "--n-examples", "16", "--batch-size", "8", "--pgd-steps", "2"]
    first = ev([ck, *flags])[ck]["results"]
    old_key = lambda e: e["attack"] + f" | first {e['n_examples']} test images" + (  # noqa: E731
        "" if e["name"] == "clean" else f" | seed {e['seed']}")
    store = torch.load(out / "last.eval.pt", weights_only=True)
    store["attacks"] = {old_key(e): e for e in store["attacks"].values()}
    pgd = next(e for e in store["attacks"].values() if e["name"] == "pgd")
    pgd["done"][1] = False  # killed before its second chunk
    torch.save(store, out / "last.eval.pt")
    record = json.load(open(out / "last.eval.json"))
    record["results"] = {(old_key(v) if v["name"] != "worst" else "worst case (Linf, eps 8/255) | first 16 test "
                          "images"): v for v in record["results"].values()}
    json.dump(record, open(out / "last.eval.json", "w"))
    calls = []
    real = evaluate.chunk_correct
    monkeypatch.setattr(evaluate, "chunk_correct", lambda model, s, *a, **k: calls.append(s["name"]) or real(
        model, s, *a, **k))
    again = ev([ck, *flags])[ck]["results"]
    assert calls == ["pgd"]  # only the missing chunk
    assert sorted((v["name"], v["accuracy"]) for v in again.values()) == sorted(
        (v["name"], v["accuracy"]) for v in first.values())  # each attack once, the same numbers
    assert all("|n=16" in k for k in again)
    # a last.pt from before --recipe (no recipe, val_loss, momentum): resumed as the same experiment
    last = torch.load(out / "last.pt", weights_only=True)
    for k in ("recipe", "val_loss"):
        last["args"].pop(k)
    last["log"] = [{k: v for k, v in r.items() if k != "momentum"} for r in last["log"]]
    torch.save(last, out / "last.pt")
    at.main(at_args(root, out, "--epochs", "2", "--milestones", "--max-batches", "1", "--resume"))
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_run_folder_hygiene(cifar, tmp_path, capsys):
    root, _ = cifar
    run = tmp_path / "run"
    # a dead run's log lines (killed after logging, before its first last.pt) and temp files of killed writes
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"epoch": 1, "val_pgd": 3.0}) + "\n")
    (run / "last.pt.tmp99999999").write_bytes(b"x" * 1000)  # no such process: a killed write
    (run / f"best.pt.tmp{os.getppid()}").write_bytes(b"x")  # a live process's write in progress: left alone
    at.main(at_args(root, run, "--epochs", "1", "--milestones", "--max-batches", "1", "--resume"))
    out = capsys.readouterr().out
    assert "resuming" not in out and "removed last.pt.tmp99999999" in out
    assert [json.loads(line)["epoch"] for line in open(run / "log.jsonl")] == [1]  # the dead run's line is gone
    assert json.loads(open(run / "log.jsonl").readline()).get("val_pgd") != 3.0
    assert glob_tmp(run) == [f"best.pt.tmp{os.getppid()}"]
    # a resume clears killed writes too, and says where it resumes
    (run / "last.pt.tmp99999998").write_bytes(b"x")
    at.main(at_args(root, run, "--epochs", "2", "--milestones", "--max-batches", "1", "--resume"))
    assert "resuming" in capsys.readouterr().out and "last.pt.tmp99999998" not in os.listdir(run)
    # an output folder that cannot be written is found before any data is read
    (tmp_path / "a_file").write_text("")
    one_line_error(at.main, *at_args(root, tmp_path / "a_file" / "run"),
                   match=r"cannot write to .*a_file/run; pass --out to a folder")


def test_a_last_pt_without_its_log_resumes_with_the_records_of_log_jsonl(cifar, tmp_path):
    # a last.pt written before the log moved into it: the resumed run's log.jsonl keeps the lines it had
    root, _ = cifar
    run = tmp_path / "run"
    at.main(at_args(root, run, "--epochs", "2", "--milestones", "--max-batches", "1"))
    ck = torch.load(run / "last.pt", weights_only=True)
    first = ck.pop("log")
    torch.save(ck, run / "last.pt")
    at.main(at_args(root, run, "--epochs", "3", "--milestones", "--max-batches", "1", "--resume"))
    records = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[:2] == first
    # another project's checkpoint with an optimizer in it: one line, not a KeyError from the log's reader
    torch.save({"optimizer": {}, "model": {}}, run / "last.pt")
    one_line_error(at.main, *at_args(root, run, "--resume"), match="is not a last.pt written by this project")


def test_weight_average_is_never_dropped_or_faked(cifar, tmp_path, capsys):
    root, _ = cifar
    # SWA starts at milestone 5; after 2 epochs there is no average: none is saved, and eval refuses it
    run = tmp_path / "swa"
    sar.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2",
              "--batch-size", "32", "--val-size", "40", "--max-batches", "1", "--wa", "--out", str(run),
              "--device", DEV])
    assert "wa=swa (equal average of the end-of-epoch weights from epoch 76" in capsys.readouterr().out
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["wa_model"] is None and ck["wa_n"] == 0 and not os.path.exists(run / "wa_best.pt")
    one_line_error(ev, str(run / "last.pt"), "--weights", "wa",
                   match=r"holds no averaged weights yet \(epoch 2; swa averages from epoch 76\)")
    # resuming must keep the --wa setting: dropping or restarting the average is refused
    base = ["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--batch-size", "32", "--val-size", "40",
            "--max-batches", "1", "--milestones", "--device", DEV]
    one_line_error(sar.main, *base, "--epochs", "3", "--milestones", "75", "90", "--resume", "--out", str(run),
                   match=r"holds another experiment: --wa True \(given False\); resume with those, or --out a new run")
    plain = tmp_path / "plain"
    at.main(base + ["--epochs", "1", "--out", str(plain)])
    one_line_error(at.main, *base, "--epochs", "2", "--resume", "--wa", "--out", str(plain),
                   match=r"holds another experiment: --wa False \(given True\);")
    ema = tmp_path / "ema"
    at.main(base + ["--epochs", "1", "--wa", "--out", str(ema)])
    one_line_error(at.main, *base, "--epochs", "2", "--resume", "--wa", "--wa-mode", "swa", "--out", str(ema),
                   match=r"holds another experiment: --wa-mode ema \(given swa\);")
    at.main(base + ["--epochs", "2", "--resume", "--wa", "--out", str(ema)])
    assert torch.load(ema / "last.pt", weights_only=True)["wa_n"] == 2  # 1 step per epoch, kept across the resume
    assert f"resuming {ema / 'last.pt'} at epoch 1; changed flags: --epochs 1 -> 2" in capsys.readouterr().out


def test_a_resume_continues_the_same_experiment_or_refuses(cifar, tmp_path, capsys):
    """The flags that define the experiment must be the checkpoint's: another --sar-lambda, --lr or --augment is
    refused in one line and nothing is written; --epochs (upwards) and --device change only how it runs."""
    root, _ = cifar
    run = tmp_path / "sar"
    base = ["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--batch-size", "16", "--val-size", "16",
            "--max-batches", "1", "--steps", "1", "--val-steps", "1", "--milestones", "--out", str(run)]
    sar.main(base + ["--epochs", "1", "--sar-lambda", "0", "--wa", "--device", DEV])  # the SAR paper's AT + SWA row
    before = {f: md5(run / f) for f in os.listdir(run)}
    for flag, value, was in (("--sar-lambda", "0.1", "0.0"), ("--lr", "0.05", "0.1"), ("--augment",
                                                                                    "idbh-cifar10-weak", "crop-flip")):
        one_line_error(sar.main, *base, "--epochs", "2", "--sar-lambda", "0", "--wa", "--resume", flag, value,
                       match=rf"holds another experiment: {flag} {was} \(given {value}\); resume with those, or --out")
        assert {f: md5(run / f) for f in os.listdir(run)} == before, flag  # nothing written
    sar.main(base + ["--epochs", "2", "--sar-lambda", "0", "--wa", "--resume", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "changed flags: --epochs 1 -> 2" in out and torch.load(run / "last.pt", weights_only=True)["epoch"] == 2
    assert ("--device cpu -> cpu" not in out) and (DEV == "cpu" or "--device cuda -> cpu" in out)
    # the checkpoint a user means: with --wa the end-of-run line names wa_best.pt, and eval.py on the folder
    # evaluates both, each labelled
    assert f"Next: python eval.py {run} (its best.pt and wa_best.pt, else last.pt)" in out
    res = ev([str(run), "--attacks", "clean", "--n-examples", "8"])
    assert set(res) == {str(run / "best.pt"), str(run / "wa_best.pt")}
    assert res[str(run / "wa_best.pt")]["weights"] == "wa" and res[str(run / "best.pt")]["weights"] == "model"
    assert "evaluating its best.pt and wa_best.pt (the weight average)" in capsys.readouterr().out


def test_a_cpu_run_of_hours_says_so_and_still_runs(cifar, tmp_path, monkeypatch, capsys):
    """On a CPU a run whose FLOP count at models.CPU_GFLOPS exceeds an hour says so in one line at its start, with
    the CPU demo's command; a short one says nothing."""
    flops = models.gflops("preact_resnet18", (3, 32, 32))
    assert flops == pytest.approx(1.11, abs=0.01)  # torch's FLOP counter, as bench.py --networks
    models.cpu_note(torch.device("cpu"), "preact_resnet18", (3, 32, 32), steps=10, images=49_000 * 200)
    out = capsys.readouterr().out
    hours = flops * 23 * 49_000 * 200 / models.CPU_GFLOPS / 3600  # PGD-10: 2 x 10 + 3 forward-equivalents an image
    assert out.startswith(f"note: this run takes ~{hours:,.0f} hours on this CPU") and out.count("\n") == 1
    assert "python at.py --dataset fashion_mnist --arch cnn" in out
    models.cpu_note(torch.device("cpu"), "cnn", (3, 32, 32), steps=10, images=1000)
    models.cpu_note(torch.device("cuda"), "preact_resnet18", (3, 32, 32), steps=10, images=49_000 * 200)
    assert capsys.readouterr().out == ""
    root, _ = cifar  # through a run: said at the start, and the run goes on
    real = data.batches
    monkeypatch.setattr(data, "batches", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        at.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "preact_resnet18", "--device", "cpu",
                 "--out", str(tmp_path / "long"), "--val-size", "8", "--epochs", "1000"])  # 4.5 hours here
    monkeypatch.setattr(data, "batches", real)
    assert "note: this run takes ~" in capsys.readouterr().out


def test_swa_batchnorm_pass_is_bounded_and_logs_are_tidy(tmp_path, monkeypatch, capsys):
    seen = []
    real = torch.optim.swa_utils.update_bn

    def counting(loader, model, *a, **k):
        batches = list(loader)
        seen.append(sum(len(b[0]) for b in batches))
        return real(batches, model, *a, **k)
    monkeypatch.setattr(torch.optim.swa_utils, "update_bn", counting)  # what wa.update_bn calls
    run = tmp_path / "run"
    at.main(["--dataset", "synthetic", "--arch", "cnn", "--epochs", "2", "--milestones", "1", "--wa", "--wa-mode",
             "swa", "--batch-size", "32", "--max-batches", "2", "--val-size", "50", "--out", str(run), "--device", DEV])
    assert seen == [512]  # one batch of 512: the 64 images of a 2-batch epoch rounded up, not all 49,950
    out = capsys.readouterr().out
    assert "wa=swa (equal average of the end-of-epoch weights from epoch 2, the first after an lr decay; " \
           "BatchNorm recomputed on clean images)" in out
    assert " | time_s " in out and " | img_per_s " in out  # times with their units in the names
    for line in open(run / "log.jsonl"):
        for k, v in json.loads(line).items():
            if isinstance(v, float):
                assert v == float(f"{v:.6g}"), (k, v)  # no float noise
    assert [json.loads(line)["lr"] for line in open(run / "log.jsonl")] == [0.1, 0.01]
    # --wa-bn adversarial: the pass sees PGD examples (training eps, steps), crafted against the model in eval mode
    crafted, passed = [], []
    real_pgd = attacks.pgd

    def recording_pgd(model, x, y, *a, **k):
        out = real_pgd(model, x, y, *a, **k)
        if len(x) == 512:  # the BatchNorm pass's batches (training batches are 32)
            crafted.append((model.training, x, out, a, k))
        return out
    monkeypatch.setattr(attacks, "pgd", recording_pgd)
    monkeypatch.setattr(torch.optim.swa_utils, "update_bn", lambda loader, model: passed.extend(b[0] for b in loader))
    at.main(["--dataset", "synthetic", "--arch", "cnn", "--epochs", "2", "--milestones", "1", "--wa", "--wa-mode",
             "swa", "--wa-bn", "adversarial", "--batch-size", "32", "--max-batches", "2", "--val-size", "0",
             "--steps", "3", "--out", str(tmp_path / "adv"), "--device", DEV])
    assert len(crafted) == len(passed) == 1
    training, x, x_adv, a, k = crafted[0]
    assert not training and (k["eps"], k["alpha"], k["steps"], k["norm"]) == (8 / 255, 2 / 255, 3, "Linf")
    assert k["random_start"] is True and k["noise"].shape == x.shape
    assert torch.equal(passed[0], x_adv) and 0 < (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_spectrum_picture_is_labelled(monkeypatch, tmp_path):
    import matplotlib.figure
    figs = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: figs.append(self) or real(self, *a, **k))
    spec = torch.rand(32, 32) + 0.1
    spectral.plot_spectra([("a/best.pt", spec, spectral.radial_profile(spec)),
                           ("b/best.pt", spec * 2, spectral.radial_profile(spec * 2))], str(tmp_path / "s.png"))
    (fig,) = figs
    labels = [ax.get_ylabel() for ax in fig.axes] + [ax.get_xlabel() for ax in fig.axes]
    assert "mean amplitude (log scale)" in labels  # the colour bar
    assert "mean amplitude in the ring" in labels and "frequency radius (0 = mean colour)" in labels
    assert os.path.getsize(tmp_path / "s.png") > 1000


def test_curve_picture_is_labelled_and_placed_where_a_comparison_belongs(monkeypatch, tmp_path):
    import checks
    import matplotlib.figure
    figs = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: figs.append(self) or real(self, *a, **k))
    rs = checks.radii(8 / 255)
    checks.plot_curves([("at/best.pt", "Linf", rs, [80, 70, 60, 50, 20, 1], [80, 69, 58, 48, 18, 0], 8 / 255),
                        ("natural/best.pt", "Linf", rs, [90, 40, 10, 1, 0, 0], [90, 39, 9, 0, 0, 0], 0)],
                       str(tmp_path / "c.png"), names=("PGD-20", "CW-30"))
    (fig,) = figs
    (ax,) = fig.axes
    assert ax.get_xlabel() == "attack radius (Linf, pixel values in [0, 1])"
    assert ax.get_ylabel() == "accuracy under attack (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2/255", "4/255", "8/255", "16/255", "32/255"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["at/best.pt (trained at 8/255)", "natural/best.pt (trained without an attack)",
                      "PGD-20 (cross-entropy)", "CW-30 (margin)", "training radius"]
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [8 / 255]  # one marker
    assert os.path.getsize(tmp_path / "c.png") > 1000
    # where eval.py puts a picture: beside one checkpoint's results; in the folder of several; else in the report
    # folder beside the runs (report.py's); --curve-out / --spectrum-out wins
    runs = tmp_path / "runs"
    assert evaluate.picture_path([str(runs / "a" / "best.eval.json")], "curve", None) == str(
        runs / "a" / "best.curve.png")
    assert evaluate.picture_path([str(runs / "a" / "best.eval.json"), str(runs / "a" / "last.eval.json")], "curve",
                                 None) == str(runs / "a" / "curve.png")
    assert evaluate.picture_path([str(runs / "a" / "best.eval.json"), str(runs / "b" / "best.eval.json")],
                                 "spectrum", None) == str(runs / "report" / "spectrum.png")
    assert os.path.isdir(runs / "report")
    assert evaluate.picture_path([str(runs / "a" / "x.json")], "curve", "elsewhere.png") == "elsewhere.png"


PROGRAMS = ("at", "sar", "iseat", "trades", "mart", "eval", "report", "bench", "vulnerability")


def parser_of(name):
    """The argparse parser program `name` builds, taken as its get_args hands it to be parsed."""
    import importlib
    import cmdline

    class Built(Exception):
        pass
    module, got = importlib.import_module(name), []

    def take(p, argv=None, **_):
        got.append(p)
        raise Built
    saved = {(m, a): getattr(m, a) for m in (module, cmdline) for a in ("parse", "parse_args") if hasattr(m, a)}
    try:
        for m, a in saved:
            setattr(m, a, take)
        module.get_args([])
    except Built:
        pass
    finally:
        for (m, a), f in saved.items():
            setattr(m, a, f)
    return got[0]


def flags_markdown():
    """docs/flags.md: every flag of every program, its default and its help, from the parsers themselves."""
    machine = {"device": "cuda if a GPU is visible, else cpu", "quick": "on without a GPU"}
    out = ["# Every flag of every program", "",
           "Generated from the programs' own parsers by `flags_markdown()` in test_all.py; a test keeps this file equal",
           "to it (after a change: `python -c \"import test_all; print(test_all.flags_markdown(), end='')\" >",
           "docs/flags.md`). `python PROGRAM.py --help` prints the same. A default of None is resolved as the help says.",
           ""]
    for name in PROGRAMS:
        p = parser_of(name)
        out += [f"## {name}.py", "", p.description, "", "| flag | default | what it is |", "|---|---|---|"]
        for a in p._actions:
            if a.dest == "help":
                continue
            default = machine.get(a.dest, a.default)
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            out.append(f"| `{', '.join(a.option_strings) or a.dest}` | {'' if shown is None and not a.option_strings else shown}"
                       f" | {a.help.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def test_every_flag_is_in_the_docs_and_help_shows_its_default(capsys):
    with open(os.path.join(HERE, "docs", "flags.md")) as f:
        assert f.read() == flags_markdown(), ("docs/flags.md differs from the parsers: python -c \"import test_all; "
                                              "print(test_all.flags_markdown(), end='')\" > docs/flags.md")
    for name in PROGRAMS:
        p = parser_of(name)
        assert all(a.help for a in p._actions), (name, [a.dest for a in p._actions if not a.help])
        with pytest.raises(SystemExit) as e:
            sys.modules[name].get_args(["--help"])
        shown = capsys.readouterr().out
        assert e.value.code == 0 and shown.count("(default:") >= len([a for a in p._actions if a.option_strings]) - 1


def documented_commands():
    """Every `python PROGRAM.py ...` and `torchrun ... PROGRAM.py ...` command of the README and docs/ (code blocks
    and inline code), with the shell's variables of the README's blocks filled in: (program, argv, where)."""
    import re
    import shlex
    found = []
    for path in ["README.md"] + sorted(f"docs/{f}" for f in os.listdir(os.path.join(HERE, "docs")) if f.endswith(".md")):
        text = open(os.path.join(HERE, path)).read().replace("\\\n", " ")
        blocks = re.findall(r"```(?:bash)?\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]*\.py[^`\n]*)`", text)
        env = dict(re.findall(r'^(\w+)="([^"]*)"', "\n".join(blocks), re.M))
        for block in blocks:
            for line in block.splitlines():
                line = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), "X"), line.split(" # ")[0])
                m = re.search(r"(?:^|\s)(?:python|torchrun)\s.*?(\b(?:%s)\.py)\b(.*)" % "|".join(PROGRAMS), line)
                if m:
                    argv = [t for t in shlex.split(m.group(2).replace("...", "X")) if t not in ("&", "&&")]
                    found.append((m.group(1)[:-3], argv, f"{path}: {line.strip()}"))
    return found


def test_the_documented_commands_name_only_flags_that_exist():
    cmds = documented_commands()
    assert len(cmds) > 40 and {p for p, _, _ in cmds} == set(PROGRAMS)
    for program, argv, where in cmds:
        p = parser_of(program)
        p.exit_on_error = False
        try:
            p.parse_args(argv)
        except (argparse.ArgumentError, SystemExit) as e:
            raise AssertionError(f"{where}: {e}") from None


def test_readme_explains_itself():
    import re
    readme = open(os.path.join(HERE, "README.md")).read()
    docs = {f: open(os.path.join(HERE, "docs", f)).read() for f in os.listdir(os.path.join(HERE, "docs"))}
    assert len(readme.splitlines()) <= 350  # a README a researcher reads; the reference material is in docs/
    for text in [readme, *docs.values()]:
        assert "../shared" not in text and "METHODS.md" not in text
        # the project's words: facts about the project, not about how its text came to be
        assert not re.search(r"\bsession\b|where this was written|was lent|\bso far\b|consulted here", text)
    for word in ("TRADES", "MART", "SAR", "ISEAT", "AutoAttack", "fashion_mnist", "DEVICE=cuda", "bench.py",
                 "report.py", "wa_best.pt", "--recipe wang2023", "--resume", "docs/flags.md"):
        assert word in readme, word
    for arxiv in ("1706.06083", "2002.11569", "2306.14262", "2303.14077", "2004.05884", "1901.08573", "2302.04638",
                  "2003.01690", "2010.09670"):  # every paper, cited with its link
        assert f"https://arxiv.org/abs/{arxiv}" in readme, arxiv
    for f in re.findall(r"\]\((docs/[\w.]+)\)", readme):  # the README's links lead somewhere
        assert os.path.exists(os.path.join(HERE, f)), f
    # the line counts docs/training.md gives are the files'
    training = docs["training.md"]
    lines = {f: sum(1 for _ in open(os.path.join(HERE, f))) for f in os.listdir(HERE) if f.endswith(".py")}
    rows = re.findall(r"^\| `(\w+\.py)` \|.*\((\d+)(?: lines)?\) \|$", training, re.M)
    assert {f for f, _ in rows} == {"wa.py", "attacks.py", "models.py", "data.py"}
    for f, n in rows:
        assert lines[f] == int(n), (f, n)
    counts = re.search(r"the methods \(([\d, ]+) lines\)", training).group(1)
    assert [int(c) for c in counts.split(", ")] == [lines[f] for f in METHOD_FILES]
    shared = sum(lines[f] for f in ("attacks.py", "data.py", "models.py", "wa.py"))
    assert f"sar.py with\nthem is {shared + lines['sar.py']:,} lines, of which {shared:,} are the four modules" in training
    # the lines of each copyable function, as the README's table gives them
    for method, name in (("PGD-AT", "at"), ("SAR", "sar"), ("ISEAT", "iseat"), ("TRADES", "trades"), ("MART", "mart")):
        row = re.search(rf"^\| {method} \| .*? \| ([\d +]+) = (\d+) \|", readme, re.M)
        assert row, method
        total = copied(sys.modules[name], METHOD_FUNCTIONS[name])[1]
        assert int(row.group(2)) == total == sum(int(v) for v in row.group(1).split(" + ")), (method, total)
    # the CPU demo: the README's commands are the ones docs/cpu_demo.sh runs and measures
    demo = re.search(r"## A ten-minute CPU demo.*?```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    script = open(os.path.join(HERE, "docs", "cpu_demo.sh")).read()
    script = script.split("# ---- the README's demo ----\n")[1].split("# ---- end ----")[0].splitlines()
    assert [line.removeprefix("t ") for line in script] == demo


# ---------------------------------------------------------------- bad input: one clear line each

def one_line_error(fn, *argv, match):
    """fn(argv) must stop with one line 'error: ...' that matches."""
    with pytest.raises((SystemExit, models.InputError)) as e:  # main() lets the modules' InputError through;
        fn(list(argv))                                              # cli() prints it as this line
    msg = str(e.value.code) if isinstance(e.value, SystemExit) else f"error: {e.value}"
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
    assert __import__("re").search(match, msg), msg
    return msg


def test_a_milestone_at_or_after_the_last_epoch_is_noted(capsys):
    # given or by default, a milestone the run never reaches is named (the lr decays only after the ones below it)
    for flags in (["--epochs", "3", "--milestones", "2", "5"], ["--epochs", "10"]):
        at.get_args(flags)
        assert "note: --milestones" in capsys.readouterr().out
    at.get_args(["--epochs", "3", "--milestones", "2"])
    assert capsys.readouterr().out == ""


def test_bad_inputs_give_one_line_errors(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    one_line_error(at.main, *at_args(root, tmp_path / "x", "--dataset", "cifar11"),
                   match=r"--dataset: invalid choice: 'cifar11' \(choose from .*'cifar10'")
    one_line_error(at.main, *at_args(root, tmp_path / "x", "--arch", "vgg"), match=r"--arch: invalid choice: 'vgg'")
    assert not (tmp_path / "x").exists()  # a run that cannot start leaves no folder behind
    # missing data, download impossible (simulated offline)
    import torchvision.datasets.cifar as tvc

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(tvc, "download_and_extract_archive", offline)
    with pytest.raises(models.InputError, match=r"cifar100 not found in .*empty/ .*cifar-100-python.tar.gz"):
        data.load("cifar100", str(tmp_path / "empty"))
    # a run that cannot start leaves no folder behind, also when it fails after the flags (here: no data)
    with pytest.raises(SystemExit, match="cifar100 not found"):  # through the scripts' entry point, as a user runs it
        at.cli(["--dataset", "cifar100", "--data-dir", str(tmp_path / "empty"), "--out",
                str(tmp_path / "made" / "run"), "--device", DEV])
    assert not (tmp_path / "made").exists()
    with pytest.raises(models.InputError, match="tiny_imagenet not found"):
        data.load("tiny_imagenet", str(tmp_path / "empty"), download=False)
    with pytest.raises(models.InputError, match="--val-size"):
        data.load("cifar10", root, val_size=10**6)
    # every numeric flag, checked before any work (no data is read, no folder is made)
    for flags, match in ((["--eps", "eight"], r"argument --eps: 'eight' is not a number or a fraction like 8/255"),
                         (["--eps", "8/0"], r"'8/0' is not a number"),
                         (["--eps", "8"], r"--eps 8, --alpha 2/255: L-inf radii and steps are in \[0,1\] pixel "
                                          r"units \(8/255, not 8\)"),
                         (["--eps", "-8/255"], r"--eps: -8/255 is outside \[0, inf\)"),
                         (["--alpha", "0"], r"--alpha: 0 is outside \(0, inf\)"),
                         (["--batch-size", "0"], r"--batch-size: 0 is outside \[1, inf\)"),
                         (["--batch-size", "-3"], r"--batch-size: -3 is outside"),
                         (["--batch-size", "many"], r"--batch-size: invalid int value: 'many'"),
                         (["--max-batches", "0"], r"--max-batches: 0 is outside \[1, inf\)"),
                         (["--epochs", "0"], r"--epochs: 0 is outside \[1, inf\)"),
                         (["--epochs", "-2"], r"--epochs: -2 is outside"),
                         (["--steps", "0"], r"--steps 0 with --eps 8/255: .* or --eps 0 for natural"),
                         (["--val-steps", "0"], r"--val-steps: 0 is outside"),
                         (["--val-size", "-1"], r"--val-size: -1 is outside"),
                         (["--lr", "0"], r"--lr: 0 is outside \(0, inf\)"),
                         (["--momentum", "1"], r"--momentum: 1 is outside \[0, 1\)"),
                         (["--wd", "-1e-4"], r"--wd: -1e-4 is outside"), (["--wa-decay", "1"], r"--wa-decay: 1 is "),
                         (["--milestones", "150", "100"], r"--milestones 150 100: give increasing epochs"),
                         (["--milestones", "0"], r"--milestones: 0 is outside \[1, inf\)"),
                         (["--rotate", "400"], r"--rotate: 400 is outside \[0, 180\]"),
                         (["--seed", "-1"], r"--seed: -1 is outside"),
                         (["--extra-fraction", "0.7"], r"--extra-fraction: give the extra images with --extra-data"),
                         (["--device", "gpu"], r"--device: invalid choice: 'gpu' \(choose from 'cuda', 'cpu'\)"),
                         (["--no-such-flag"], r"unrecognized arguments: --no-such-flag")):
        one_line_error(at.main, *at_args(root, tmp_path / "never", *flags), match=match)
    assert not (tmp_path / "never").exists()
    if not torch.cuda.is_available():
        one_line_error(at.main, *at_args(root, tmp_path / "never", "--device", "cuda"),
                       match=r"--device cuda: no CUDA GPU is visible; use --device cpu")
    one_line_error(sar.main, "--sar-lambda", "-1", match=r"--sar-lambda: -1 is outside \[0, inf\)")
    one_line_error(iseat.main, "--lam", "0", "-0.1", match=r"--lam: -0.1 is outside \[0, inf\)")
    one_line_error(iseat.main, "--awp-gamma", "-1", match=r"--awp-gamma: -1 is outside")
    one_line_error(iseat.main, "--awp-eta", "0", match=r"--awp-eta: 0 is outside \(0, inf\)")
    one_line_error(trades.main, "--beta", "-1", match=r"--beta: -1 is outside")
    one_line_error(trades.main, "--label-smoothing", "1", match=r"--label-smoothing: 1 is outside \[0, 1\)")
    one_line_error(mart.main, "--beta", "-1", match=r"--beta: -1 is outside")

    run = tmp_path / "run"
    at.main(at_args(root, run, "--epochs", "1", "--milestones", "--max-batches", "1"))
    one_line_error(at.main, *at_args(root, run, "--epochs", "1", "--milestones"),
                   match="already holds a run .*pass --resume")
    one_line_error(at.main, *at_args(root, run, "--resume", "--arch", "resnet18"),
                   match=r"holds another experiment: --arch cnn \(given resnet18\), .*resume with those, or --out")
    one_line_error(sar.main, *at_args(root, run, "--resume"), match=r"holds a run of at.py; pass --out for a new run")
    # a run folder stands for its best.pt; one without it is refused, naming what it holds
    res = ev([str(run), "--attacks", "clean", "--n-examples", "8"])
    assert str(run / "best.pt") in res
    (tmp_path / "nobest").mkdir()
    torch.save({}, tmp_path / "nobest" / "epoch_1.pt")
    one_line_error(ev, str(tmp_path / "nobest"), match=r"nobest is a folder without best.pt or last.pt; pass one of "
                                                       r"its checkpoints \(epoch_1.pt\)")
    with pytest.raises(ValueError, match="fft='dct'"):
        sar.sar_loss(torch.zeros(2, 3), torch.zeros(2, 3), "dct")
    # eval's flags
    for flags, match in ((["--n-examples", "0"], r"--n-examples: 0 is outside \[1, inf\)"),
                         (["--n-examples", "-5"], r"--n-examples: -5 is outside"),
                         (["--batch-size", "0"], r"--batch-size: 0 is outside"), (["--eps", "8"], r"--eps 8: L-inf radii"),
                         (["--pgd-steps", "0"], r"--pgd-steps"), (["--restarts", "0"], r"--restarts: 0 is outside"),
                         (["--attacks"], r"nothing to do"), (["--checks-n", "0"], r"--checks-n: 0 is outside \[1, inf\)"),
                         (["--checks", "--square-queries", "0"], r"--square-queries: 0 is outside"),
                         (["--curve", "--curve-out", "/proc/x/c.png"], r"--curve-out")):
        one_line_error(evaluate.main, str(run / "last.pt"), *flags, match=match)
    # a checkpoint of another architecture
    torch.save(models.get_model("resnet18", 10).state_dict(), tmp_path / "r18.pt")
    one_line_error(ev, str(tmp_path / "r18.pt"), "--arch", "cnn", "--dataset", "cifar10", "--data-dir", root,
                   match=r"does not fit arch 'cnn': \d+ missing keys .* pass the --arch")
    one_line_error(ev, str(tmp_path / "r18.pt"), match="pass --arch and --dataset")
    one_line_error(ev, str(run / "last.pt"), "--arch", "resnet18", match="trained with --arch cnn, not resnet18")
    one_line_error(ev, str(run / "last.pt"), "--weights", "wa", match="holds no weight average")
    # a truncated file, an empty one, a text file, a missing one
    blob = open(run / "last.pt", "rb").read()
    open(tmp_path / "trunc.pt", "wb").write(blob[: len(blob) // 2])
    one_line_error(ev, str(tmp_path / "trunc.pt"), match="truncated or not a torch checkpoint")
    open(tmp_path / "empty.pt", "wb").close()
    one_line_error(ev, str(tmp_path / "empty.pt"), match=r"empty.pt is empty \(0 bytes\)")
    open(tmp_path / "notes.pt", "w").write("hello, this is text\n")
    one_line_error(ev, str(tmp_path / "notes.pt"), "--arch", "cnn", "--dataset", "cifar10",
                   match="not a torch checkpoint")
    one_line_error(ev, str(tmp_path / "nothing.pt"), match="does not exist")
    # a pickle that is not plain tensors and values is refused, and its code never runs
    torch.save({"model": models.get_model("cnn", 10)}, tmp_path / "pickled_module.pt")
    one_line_error(ev, str(tmp_path / "pickled_module.pt"), "--arch", "cnn", "--dataset", "cifar10",
                   match="refusing to load .* weights_only=True")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    one_line_error(ev, str(tmp_path / "evil.pt"), "--arch", "cnn", "--dataset", "cifar10", match="refusing to load")
    assert not marker.exists()


@pytest.mark.slow
def test_errors_print_once_under_torchrun(tmp_path):
    """Every rank runs the same checks; only rank 0 prints the line."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "at.py"), "--eps", "8",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("error: --eps 8, --alpha 2/255: L-inf radii and steps are in [0,1] pixel units") == 1, \
        r.stderr[-3000:]


# ---------------------------------------------------------------- SAR



def slow_dft(z, axes):
    """Explicit DFT sums: F[k, m] = sum_b sum_c z[b, c] exp(-2 pi i (k b / B + m c / C)) over the chosen axes."""
    B, C = z.shape
    out = torch.zeros(B, C, dtype=torch.complex128)
    for k in range(B):
        for m in range(C):
            s = 0
            for b in range(B):
                for c in range(C):
                    if axes == "batch_class":
                        s += z[b, c].item() * np.exp(-2j * np.pi * (k * b / B + m * c / C))
                    elif b == k:  # class axis only, per sample
                        s += z[b, c].item() * np.exp(-2j * np.pi * m * c / C)
            out[k, m] = s
    return out


@pytest.mark.parametrize("fft", ["batch_class", "class"])
def test_sar_loss_matches_explicit_dft(fft):
    torch.manual_seed(0)
    za, zc = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    da, dc = slow_dft(za.detach().double(), fft), slow_dft(zc.detach().double(), fft)
    want = torch.cat([(da - dc).real.flatten(), (da - dc).imag.flatten()]).abs().mean()  # over 2*B*C numbers
    got = sar.sar_loss(za, zc, fft)
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 1e-5
    assert sar.sar_loss(za, za.detach().clone(), fft).item() == 0
    got.backward()
    assert za.grad.abs().sum() > 0 and zc.grad.abs().sum() > 0  # both branches get gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 even under autocast
        assert sar.sar_loss(za.bfloat16(), zc.bfloat16(), fft).dtype == torch.float32


def test_sar_trains_switches_on_at_start_epoch_and_eval_reads_it(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    modes = []
    real_pgd = attacks.pgd

    def recording_pgd(model, *a, **k):
        modes.append((model.training, k["steps"] if "steps" in k else a[4]))
        return real_pgd(model, *a, **k)
    monkeypatch.setattr(attacks, "pgd", recording_pgd)  # validation
    monkeypatch.setattr(sar, "pgd", recording_pgd)  # the training attack
    calls = []
    real_loss = sar.sar_loss
    monkeypatch.setattr(sar, "sar_loss", lambda *a: calls.append(a[0].shape) or real_loss(*a))
    out = tmp_path / "sar"
    sar.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2", "--milestones", "1",
              "--batch-size", "32", "--val-size", "40", "--max-batches", "3", "--sar-start-epoch", "1",
              "--out", str(out), "--device", DEV])
    assert not any(training for training, _ in modes)  # the training attack (and validation) ran in eval mode
    # 3 training batches with PGD-10 per epoch, then validation (one call of 40 images) with PGD-20: the released
    # code's selection criterion
    assert [steps for _, steps in modes] == [10, 10, 10, 20] * 2
    assert len(calls) == 3  # the term is on in the second epoch only
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["train_sar"] is None and log[1]["train_sar"] > 0
    monkeypatch.setattr(attacks, "pgd", real_pgd)
    monkeypatch.setattr(sar, "pgd", real_pgd)
    monkeypatch.setattr(sar, "sar_loss", real_loss)
    out_wa = tmp_path / "sar_wa"
    sar.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2", "--milestones", "1",
              "--batch-size", "32", "--val-size", "40", "--max-batches", "2", "--wa", "--out", str(out_wa),
              "--device", DEV])
    ck = torch.load(out_wa / "last.pt", weights_only=True)
    assert ck["method"] == "sar" and ck["wa_n"] == 1 and ck["args"]["sar_lambda"] == 0.1
    res = ev([str(out_wa / "last.pt"), "--weights", "wa", "--attacks", "clean", "pgd", "--n-examples", "8",
              "--lowpass", "--spectrum"])
    rec = res[str(out_wa / "last.pt")]
    (lowpass,) = rec["lowpass"].values()
    assert set(lowpass["accuracy"]) == {"32", "28", "24", "20", "16"} and lowpass["window"] == "symmetric"
    (spectrum,) = rec["spectrum"].values()
    assert len(spectrum["radial_profile"]) > 10
    assert os.path.getsize(out_wa / "last.wa.spectrum.png") > 1000


def test_lowpass_filter_identity_and_window():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(spectral.lowpass(x, 32), x, atol=1e-5)
    for k in (28, 16):
        f = spectral.lowpass(x, k)
        spec = torch.fft.fftshift(torch.fft.fft2(f), dim=(-2, -1))  # zero frequency at [16, 16]
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[16 - k // 2:16 + k // 2 + 1, 16 - k // 2:16 + k // 2 + 1] = True  # frequencies -k/2 .. k/2
        assert spec[..., ~inside].abs().max() < 1e-3  # no energy outside the window
        full = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
        assert torch.allclose(spec[..., inside], full[..., inside], atol=1e-3)  # inside it, untouched
    assert spectral.lowpass_ks(64) == [64, 56, 48, 40, 32]
    # the paper's exact k x k reading: frequencies -k/2 .. k/2 - 1 (a k-wide crop of the centred spectrum), the
    # real part of the inverse; its spectrum is the Hermitian-symmetrised crop (unpaired +-k/2 halved)
    for k in (16, 15):
        f = spectral.lowpass(x, k, window="kxk")
        full = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
        crop = torch.zeros(32, 32, dtype=torch.bool)
        crop[16 - k // 2:16 - k // 2 + k, 16 - k // 2:16 - k // 2 + k] = True
        assert crop.sum() == k * k
        kept = torch.where(crop, full, torch.zeros_like(full))
        mirrored = torch.roll(torch.flip(kept, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1)).conj()  # X(-f)*
        want = torch.fft.ifft2(torch.fft.ifftshift((kept + mirrored) / 2, dim=(-2, -1))).real
        assert torch.allclose(f, want, atol=1e-4)
    assert torch.allclose(spectral.lowpass(x, 32, window="kxk"), x, atol=1e-5)
    assert torch.allclose(spectral.lowpass(x, 15, window="kxk"), spectral.lowpass(x, 15), atol=1e-5)  # odd k: same


def test_perturbation_spectrum_and_radial_profile_match_slow_computation():
    torch.manual_seed(0)
    d = torch.randn(3, 2, 8, 8)
    spec = spectral.amplitude_spectrum(d)
    slow = torch.zeros(8, 8)
    for i in range(3):
        for c in range(2):
            slow += torch.from_numpy(np.fft.fftshift(np.abs(np.fft.fft2(d[i, c].numpy())))).float()
    assert torch.allclose(spec, slow / 6, atol=1e-4)
    prof = spectral.radial_profile(spec)
    rings = {}
    for u in range(8):
        for v in range(8):
            rings.setdefault(round(((u - 4) ** 2 + (v - 4) ** 2) ** 0.5), []).append(spec[u, v].item())
    assert torch.allclose(prof, torch.tensor([np.mean(rings[r]) for r in sorted(rings)], dtype=torch.float32))


# ---------------------------------------------------------------- ISEAT



def test_rank_weights_on_known_vectors_with_ties():
    av = torch.tensor([0.5, -1.0, 0.5, 2.0, 0.0])
    # ascending: -1 (1), 0 (4), 0.5 (0), 0.5 (2; a tie keeps batch order), 2 (3)
    assert torch.allclose(iseat.rank_weights(av), torch.tensor([3, 1, 4, 5, 2]) / 5)
    torch.manual_seed(0)
    av = torch.randint(0, 4, (16,)).float()  # many ties
    w = iseat.rank_weights(av)
    assert sorted((w * 16).round().long().tolist()) == list(range(1, 17))  # exactly {1/B, ..., 1}
    assert w[av.argmax()] > 0 and (w[av == av.max()].max() == 1.0)
    assert (w[av < av.max()] < w[av == av.max()].min()).all()  # larger vulnerability, larger weight


def test_awp_direction_norms_and_exact_restore():
    torch.manual_seed(0)
    model = models.get_model("cnn", 10).to(DEV)
    x, y = torch.rand(8, 3, 8, 8, device=DEV), torch.randint(0, 10, (8,), device=DEV)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    v = iseat.awp_direction(model, x, y, eta=0.01)
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())  # the proxy's statistics are its own
    params = dict(model.named_parameters())
    kernels = {f"conv{i}.weight" for i in (1, 2, 3, 4)} | {"linear.weight"}
    assert set(v) == {n for n, p in params.items() if p.dim() >= 2} == kernels
    for n, d in v.items():
        assert torch.allclose(d.norm(), params[n].norm(), rtol=1e-5)
    # the direction is the normalised gradient of the adversarial CE (the proxy's step is eta times it)
    g = torch.autograd.grad(F.cross_entropy(model(x), y), [params["conv1.weight"]])[0]
    assert torch.allclose(v["conv1.weight"], params["conv1.weight"].norm() * g / g.norm(), atol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with iseat.awp_perturbed(model, v, 7e-3):
        after = {k: t.clone() for k, t in model.state_dict().items()}
    for k in before:
        changed = not torch.equal(after[k], before[k])
        assert changed == (k in v), k  # BatchNorm parameters and buffers, and biases, untouched
        if k in v:
            assert torch.allclose(after[k] - before[k], 7e-3 * v[k], atol=1e-7)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k  # bitwise


def slow_iseat_step(model, x, y, gamma, lam, lr=0.1, momentum=0.9, wd=5e-4):
    """The same step written the obvious way: separate copies at theta and at theta + gamma v, each branch's
    gradient taken at its own point, summed; SGD (first step: momentum buffer = gradient) at theta + gamma v."""
    m0 = copy.deepcopy(model).train()
    z0 = m0(x)
    x_adv = attacks.pgd(m0, x, y, 8 / 255, 2 / 255, 10, random_start=False)
    kernels = [n for n, p in m0.named_parameters() if p.dim() >= 2]
    p0 = dict(m0.named_parameters())
    mg = copy.deepcopy(m0)
    pg = dict(mg.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(mg(x_adv), y), [pg[n] for n in kernels])
    v = {n: p0[n].detach().norm() * g / g.norm() for n, g in zip(kernels, grads)}
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        for n, p in m1.named_parameters():
            if n in v:
                p.add_(gamma * v[n])
    z1 = m1(x_adv)
    ce_adv = F.cross_entropy(z1, y, reduction="none")
    ce_clean = F.cross_entropy(z0, y, reduction="none")
    av = (ce_adv - ce_clean).tolist()
    B = len(y)
    w = [0.0] * B
    for j, i in enumerate(sorted(range(B), key=lambda i: av[i])):
        w[i] = (j + 1) / B
    w = torch.tensor(w, device=x.device)
    adv_branch = ce_adv.mean() + lam / B * sum(w[i] * ((z1[i] - z0[i].detach()) ** 2).sum() for i in range(B))
    clean_branch = lam / B * sum(w[i] * ((z1[i].detach() - z0[i]) ** 2).sum() for i in range(B))
    g1 = torch.autograd.grad(adv_branch, list(m1.parameters()))
    g0 = torch.autograd.grad(clean_branch, list(m0.parameters()), allow_unused=True)
    new = {}
    for (n, p1), a, b in zip(m1.named_parameters(), g1, g0):
        g = a + (b if b is not None else 0)
        stepped = p1.detach() - lr * (g + wd * p1.detach())  # SGD at the perturbed point
        new[n] = stepped - (gamma * v[n] if n in v else 0)  # then the perturbation is removed
    return new, (adv_branch.detach() + clean_branch.detach() * 0).item()


@pytest.mark.parametrize("gamma,lam", [(7e-3, 0.1), (7e-3, 0.0), (0.0, 0.5)])
def test_iseat_step_equals_slow_computation(gamma, lam):
    torch.manual_seed(0)
    model = models.get_model("cnn", 10).to(DEV)
    model.train()
    x, y = torch.rand(12, 3, 8, 8, device=DEV), torch.randint(0, 10, (12,), device=DEV)
    want, want_loss = slow_iseat_step(model, x, y, gamma, lam)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    # the step as iseat.py's loop takes it: the objective, backward, the optimiser step at theta + gamma v
    loss, _, _, v = iseat.iseat_objective(model, x, y, 8 / 255, 2 / 255, 10, gamma, 0.01, lam)
    opt.zero_grad()
    loss.backward()
    with iseat.awp_perturbed(model, v, gamma):
        opt.step()
    assert abs(loss.item() - want_loss) < 1e-5
    for n, p in model.named_parameters():
        assert torch.allclose(p, want[n], atol=1e-6, rtol=1e-5), n


def test_iseat_trains_switches_lambda_at_milestone_and_eval_reads_it(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    calls = []
    real = iseat.rank_weights
    monkeypatch.setattr(iseat, "rank_weights", lambda av: calls.append(len(av)) or real(av))
    base = ["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2", "--milestones", "1",
            "--batch-size", "32", "--val-size", "40", "--max-batches", "3", "--device", DEV]
    iseat.main(base + ["--out", str(tmp_path / "i")])
    assert len(calls) == 3  # the smoothing term is on from the first milestone (epoch 2) only
    log = [json.loads(line) for line in open(tmp_path / "i" / "log.jsonl")]
    assert [r["lam"] for r in log] == [0.0, 0.1]
    assert log[0]["train_smooth"] is None and log[1]["train_smooth"] > 0
    iseat.main(base + ["--wa", "--out", str(tmp_path / "iwa")])
    ck = torch.load(tmp_path / "iwa" / "last.pt", weights_only=True)
    assert ck["method"] == "iseat" and ck["wa_n"] == 6 and ck["args"]["awp_gamma"] == 7e-3
    res = ev([str(tmp_path / "iwa" / "last.pt"), "--weights", "wa", "--attacks", "clean", "cw",
              "--n-examples", "8"])
    assert 0 <= res[str(tmp_path / "iwa" / "last.pt")]["ran"]["cw"]["accuracy"] <= 100
    # the training attack has no random start, unless asked for (Wu et al.'s AWP)
    starts = []
    real_pgd = attacks.pgd
    monkeypatch.setattr(iseat, "pgd", lambda *a, **k: starts.append(k.get("random_start")) or real_pgd(*a, **k))
    for flag in ([], ["--random-start"]):
        iseat.main(base + flag + ["--epochs", "1", "--milestones", "--max-batches", "1", "--val-size", "0",
                                  "--out", str(tmp_path / f"rs{len(flag)}")])
    assert starts == [False, True]


# ---------------------------------------------------------------- TRADES and MART

import math  # noqa: E402


def softmax_list(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def slow_trades(za, zc, y, beta):
    """CE(f(x), y) + beta/B sum_i sum_c p_ic (log p_ic - log p'_ic), one sample and one class at a time."""
    B, C = za.shape
    ce = kl = 0.0
    for i in range(B):
        pa, pc = softmax_list(za[i].tolist()), softmax_list(zc[i].tolist())
        ce += -math.log(pc[int(y[i])])
        kl += sum(pc[c] * (math.log(pc[c]) - math.log(pa[c])) for c in range(C))
    return ce / B + beta * kl / B


def slow_mart(za, zc, y, beta):
    """Boosted CE on x' (its largest wrong class found by a loop) + beta/B sum_i KL_i (1.0000001 - p_y(x_i))."""
    B, C = za.shape
    bce = robust = 0.0
    for i in range(B):
        pa, pc = softmax_list(za[i].tolist()), softmax_list(zc[i].tolist())
        t = int(y[i])
        wrong = max((c for c in range(C) if c != t), key=lambda c: pa[c])
        bce += -math.log(pa[t]) - math.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(pc[c] * (math.log(pc[c]) - math.log(pa[c] + 1e-12)) for c in range(C))
        robust += kl * (1.0000001 - pc[t])
    return bce / B + beta * robust / B


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_trades_and_mart_losses_match_slow_loops(name):
    fn, slow = (trades.trades_loss, slow_trades) if name == "trades" else (mart.mart_loss, slow_mart)
    torch.manual_seed(0)
    za, zc = torch.randn(6, 5, dtype=torch.float64) * 2, torch.randn(6, 5, dtype=torch.float64) * 2
    y = torch.randint(0, 5, (6,))
    y[0] = za[0].argmax()  # one sample whose adversarial prediction is still right: its wrong class is the 2nd
    for beta in (6.0, 1.0, 0.0):
        got = fn(za.float(), zc.float(), y, beta)
        assert got.dtype == torch.float32 and abs(got.item() - slow(za, zc, y, beta)) < 1e-4
    # gradients flow through both branches (the clean prediction is no detached target): compare with central
    # differences of the slow loop
    a, c = za.float().requires_grad_(True), zc.float().requires_grad_(True)
    fn(a, c, y, 6.0).backward()
    h = 1e-4
    for grad, which in ((a.grad, "adv"), (c.grad, "clean")):
        for (i, j) in ((0, 0), (2, 3), (5, 1)):
            plus, minus = za.clone(), za.clone()
            if which == "clean":
                plus, minus = zc.clone(), zc.clone()
            plus[i, j] += h
            minus[i, j] -= h
            args_p = (plus, zc) if which == "adv" else (za, plus)
            args_m = (minus, zc) if which == "adv" else (za, minus)
            numeric = (slow(*args_p, y, 6.0) - slow(*args_m, y, 6.0)) / (2 * h)
            assert abs(grad[i, j].item() - numeric) < 1e-3, (which, i, j)
    assert c.grad.abs().sum() > 0 and a.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 even under autocast
        assert fn(za.bfloat16(), zc.bfloat16(), y, 6.0).dtype == torch.float32


def released_attack(model, x, y, eps, step, steps, kind):
    """The released attack loops (TRADES trades.py, MART mart.py), written as they are there: nn.KLDivLoss with a
    summed reduction / the mean CE, torch.min/max projection, then the box; the start noise is drawn like x."""
    model.eval()
    kl = nn.KLDivLoss(reduction="sum")
    x_adv = x.detach() + 0.001 * torch.randn_like(x).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            if kind == "trades":
                loss = kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
            else:
                loss = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return torch.clamp(x_adv, 0.0, 1.0)


@pytest.mark.parametrize("kind", ["trades", "mart"])
def test_trades_and_mart_attacks_follow_the_released_loops(kind):
    torch.manual_seed(0)
    model = models.get_model("cnn", 10).to(DEV).eval()
    x, y = torch.rand(8, 3, 12, 12, device=DEV), torch.randint(0, 10, (8,), device=DEV)
    x[:2] = 1.0  # on the box's face
    torch.manual_seed(5)
    want = released_attack(model, x, y, 8 / 255, 2 / 255, 7, kind)
    torch.manual_seed(5)
    got = (trades.trades_attack(model, x, 8 / 255, 2 / 255, 7) if kind == "trades"
           else mart.mart_attack(model, x, y, 8 / 255, 2 / 255, 7))
    assert same(got, want)
    assert (got - x).abs().max() <= 8 / 255 + 1e-6 and got.min() >= 0 and got.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_trades_and_mart_released_settings_and_training(cifar, tmp_path, monkeypatch):
    a = trades.get_args(["--released"])
    assert (a.eps, a.alpha, a.wd, a.epochs, a.milestones, a.beta) == (0.031, 0.007, 2e-4, 76, [74, 89, 99], 6.0)
    a = mart.get_args(["--released", "--eps", "8/255", "--epochs", "3"])  # flags given explicitly still win
    assert (a.eps, a.alpha, a.epochs) == (8 / 255, 0.007, 3)
    a = trades.get_args([])
    assert (a.eps, a.alpha, a.wd, a.epochs, a.milestones) == (8 / 255, 2 / 255, 5e-4, 100, [75, 90])
    # both train; their attacks, called in train mode, run in eval mode and leave BatchNorm's statistics alone, and
    # the forwards run in train mode; eval.py reads them
    root, _ = cifar
    for module in (trades, mart):
        seen = []
        real = module.trades_attack if module is trades else module.mart_attack
        attack_name = "trades_attack" if module is trades else "mart_attack"

        def spy(model, *a, real=real, **k):
            stats = [b.clone() for b in model.buffers()]
            calls = []
            handle = model.register_forward_pre_hook(lambda m, args: calls.append(m.training))
            was = model.training
            out = real(model, *a, **k)
            handle.remove()
            seen.append((was, set(calls), model.training,
                         all(torch.equal(b, s) for b, s in zip(model.buffers(), stats))))
            return out
        monkeypatch.setattr(module, attack_name, spy)
        out = tmp_path / module.__name__
        module.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2", "--milestones", "1",
                     "--batch-size", "32", "--val-size", "40", "--max-batches", "2", "--out", str(out),
                     "--device", DEV])
        assert seen == [(True, {False}, True, True)] * 4
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        assert [r["epoch"] for r in log] == [1, 2] and all(r["train_kl"] >= 0 for r in log)
        ck = torch.load(out / "best.pt", weights_only=True)
        assert ck["method"] == module.__name__ and ck["args"]["beta"] == 6.0
        res = ev([str(out / "best.pt"), "--attacks", "clean", "fgsm", "--n-examples", "8"])
        assert 0 <= res[str(out / "best.pt")]["ran"]["fgsm"]["accuracy"] <= 100


# ---------------------------------------------------------------- the report

def test_report_writes_the_table_and_the_curves(cifar, tmp_path):
    import csv
    import report
    root, _ = cifar
    runs = tmp_path / "runs"
    at.main(at_args(root, runs / "at", "--wa", "--wa-mode", "swa", "--max-batches", "2"))
    sar.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2", "--milestones", "1",
              "--batch-size", "32", "--val-size", "40", "--max-batches", "2", "--out", str(runs / "sar"),
              "--device", DEV])
    ev([str(runs / "at" / "best.pt"), "--attacks", "clean", "fgsm", "pgd", "--n-examples", "16", "--pgd-steps", "2"])
    ev([str(runs / "at" / "best.pt"), "--attacks", "pgd", "--n-examples", "8", "--pgd-steps", "2"])  # fewer images
    ev([str(runs / "at" / "last.pt"), "--weights", "wa", "--attacks", "clean", "--n-examples", "16"])
    ev([str(runs / "sar" / "last.pt"), "--attacks", "clean", "pgd", "--n-examples", "16", "--pgd-steps", "4"])
    (runs / "empty").mkdir()
    rows = report.main([str(runs / "*"), "--out", str(tmp_path / "rep")])
    got = {(r["run"], r["checkpoint"]) for r in rows}
    assert got == {("at", "best"), ("at", "last"), ("at", "wa best"), ("at", "last, wa"), ("sar", "best"),
                   ("sar", "last")}
    md = open(tmp_path / "rep" / "report.md").read()
    best_eval = stored(runs / "at" / "best.eval.json")
    pgd16 = by_name(best_eval, "pgd", 16)[0]
    row = [r for r in rows if (r["run"], r["checkpoint"]) == ("at", "best")][0]
    assert row["pgd"]["accuracy"] == pgd16["accuracy"]  # the result on the most images, not the later smaller one
    log = [json.loads(line) for line in open(runs / "at" / "log.jsonl")]
    assert row["epoch"] == max(log, key=lambda r: r["val_pgd"])["epoch"] and row["epochs"] == "3/3"
    # two PGD settings in the column (PGD-2 for at, PGD-4 for sar): numbered notes, each with its settings
    assert "[pgd1] PGD: PGD-2 (Linf, eps 8/255, step 2/255, random start, 1 restart), first 16 test images" in md
    assert "[pgd2] PGD: PGD-4" in md and "- FGSM: FGSM (Linf, eps 8/255" in md
    lines = [line for line in md.splitlines() if line.startswith("| at | best |")]
    assert len(lines) == 1 and f"{pgd16['accuracy']:.2f} [pgd1]" in lines[0]
    (sar_last,) = [line for line in md.splitlines() if line.startswith("| sar | last |")]
    assert sar_last.split("|")[10].strip() != "" and sar_last.split("|")[11].strip() == ""  # clean, no FGSM: empty
    with open(tmp_path / "rep" / "report.csv") as f:
        table = list(csv.DictReader(f))
    (c,) = [r for r in table if (r["run"], r["checkpoint"]) == ("at", "best")]
    assert float(c["pgd"]) == pgd16["accuracy"] and c["pgd_n"] == "16" and c["pgd_attack"].startswith("PGD-2 ")
    assert c["aa"] == "" and c["val_attack"] == "PGD-10"
    assert os.path.getsize(tmp_path / "rep" / "curves.png") > 10000


# ---------------------------------------------------------------- several processes (torchrun, gloo on the CPU)


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch (torch's SyncBatchNorm, which takes
    only GPU tensors, for gloo/CPU processes): the per-rank sums are all-reduced with autograd, so the gradient is
    the one-process gradient once DDP has averaged it. Same parameters, buffers and running-statistics update as
    BatchNorm2d."""

    def forward(self, x):
        import torch.distributed as dist
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        dims = (0, 2, 3)
        count = all_reduce(torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device))
        mean = all_reduce(x.sum(dims)) / count
        var = all_reduce(((x - mean[None, :, None, None]) ** 2).sum(dims)) / count  # two passes: as exact as BN's
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * count / (count - 1), alpha=f)
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def global_batchnorm(model, process_group=None):
    """Stands in for nn.SyncBatchNorm.convert_sync_batchnorm in the torchrun tests (LAUNCHER): every BatchNorm2d
    computes its training statistics over the global batch with GlobalBatchNorm2d, which gloo's CPU processes run."""
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            ref = child.running_mean if child.running_mean is not None else child.weight
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=ref.device, dtype=ref.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            global_batchnorm(child)
    return model


LAUNCHER = '''
import importlib, os, signal, sys
sys.path.insert(0, {repo!r})
import torch, torch.nn as nn
import models
real_get_model = models.get_model
if os.environ.get("SMALL"):  # the authors' networks at test size (see small_authors_networks)
    import test_all
    models.ARCHS.update(test_all.SMALL_AUTHORS_NETWORKS)
def get_model(arch, n, in_channels=3, dataset=None):
    m = real_get_model(arch, n, in_channels, dataset=dataset)
    if os.environ.get("NO_BN"):  # a model without batch statistics
        m.bn1, m.bn2, m.bn3, m.bn4 = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
    if os.environ.get("DOUBLE"):  # float64 weights and activations: see test_torchrun_gives_the_one_process_result
        m = m.double()
        m.register_forward_pre_hook(lambda mod, args: (args[0].double(),))
    return m
models.get_model = get_model
if os.environ.get("CIFAR_ROOT"):  # synthetic CIFAR-10 files: their own checksums, as in the in-process tests
    import hashlib
    import torchvision.datasets as tvd
    folder = os.path.join(os.environ["CIFAR_ROOT"], tvd.CIFAR10.base_folder)
    md5 = lambda n: hashlib.md5(open(os.path.join(folder, n), "rb").read()).hexdigest()
    tvd.CIFAR10.train_list = [[n, md5(n)] for n, _ in tvd.CIFAR10.train_list]
    tvd.CIFAR10.test_list = [[n, md5(n)] for n, _ in tvd.CIFAR10.test_list]
    tvd.CIFAR10.meta = dict(tvd.CIFAR10.meta, md5=md5(tvd.CIFAR10.meta["filename"]))
if os.environ.get("DIE") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    # RANK:N: that worker kills itself with SIGKILL at its N-th training batch, in the group's first attempt
    import data
    rank, n = os.environ["DIE"].split(":")
    real_batches, seen = data.batches, []
    def batches(*a, **k):
        for b in real_batches(*a, **k):
            seen.append(1)
            if len(seen) == int(n) and os.environ.get("RANK") == rank:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b
    data.batches = batches
# --sync-bn on CPU processes: nn.SyncBatchNorm takes GPU tensors only, so the test's GlobalBatchNorm2d stands in
import test_all
torch.nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(test_all.global_batchnorm)
result = []  # through the scripts' own entry point: its one-line errors
result.append(importlib.import_module(sys.argv[1]).cli(sys.argv[2:]))
model, avg = result[0]
torch.save({{"model": model.state_dict(), "wa": avg.module.state_dict() if avg is not None else None}},
           os.path.join(os.environ["STATE_DIR"], "rank%s.pt" % os.environ.get("RANK", "single")))
'''


def launch(tmp_path, method, args, nproc=2, no_bn=False, cifar_root=None, double=False, torchrun=(), env=None,
           wait=True, small=False):
    # Runs METHOD.main(args) under torchrun (nproc processes) or plainly (nproc 0); returns {rank: state}, stdout
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER.format(repo=os.path.dirname(os.path.abspath(__file__))))
    state_dir = tmp_path / f"states-{len(list(tmp_path.glob('states-*')))}"
    state_dir.mkdir()
    env = dict(os.environ, STATE_DIR=str(state_dir), OMP_NUM_THREADS="1", **(env or {}))
    env.pop("WORLD_SIZE", None)
    if no_bn:
        env["NO_BN"] = "1"
    if double:
        env["DOUBLE"] = "1"
    if small:
        env["SMALL"] = "1"
    if cifar_root:
        env["CIFAR_ROOT"] = cifar_root
    run = ["-m", "torch.distributed.run", *(torchrun or ["--standalone"]), f"--nproc_per_node={nproc}"]
    cmd = [sys.executable] + (run if nproc else []) + [str(script), method] + args
    # a session of its own, so that a launcher that has to be stopped is stopped with all its workers
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    if not wait:
        return p, state_dir
    out = finish(p, 300)
    assert p.returncode == 0, out[-5000:]
    return states_in(state_dir), out


def finish(p, timeout):
    """The output of a launcher; past `timeout` seconds it is killed with its workers and the test fails."""
    import signal
    try:
        return p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out = p.communicate()[0]
        raise AssertionError(f"still running after {timeout} s:\n" + out[-5000:]) from None


def states_in(state_dir):
    return {p.stem[4:]: torch.load(p, weights_only=True) for p in state_dir.glob("rank*.pt")}


def assert_close_states(a, b, atol=0.0):
    for part in ("model", "wa"):
        if a[part] is None:
            continue
        for k in a[part]:
            if atol == 0:
                assert torch.equal(a[part][k], b[part][k]), (part, k)
            else:
                assert torch.allclose(a[part][k].double(), b[part][k].double(), atol=atol, rtol=0), (part, k)


DDP_ARGS = ["--dataset", "synthetic", "--arch", "cnn", "--max-batches", "3", "--val-size", "50",
            "--batch-size", "32", "--milestones", "1", "--device", "cpu"]  # gloo: CPU processes, also with DEVICE=cuda
METHOD_ARGS = {"at": ["--norm", "L2"], "sar": [], "iseat": ["--random-start"], "mart": [],
               "trades": ["--augment", "idbh-cifar10-strong"]}  # at: L2's random start (a point of the unit ball per
# image) drawn for the global batch too; trades: IDBH's draws too


@pytest.mark.slow
@pytest.mark.parametrize("method", ["at", "sar", "iseat", "trades", "mart"])
def test_torchrun_gives_the_one_process_result(cifar, tmp_path, method):
    # Every method on 2 processes with --sync-bn is the one-process method: BatchNorm over the global batch, the
    # random starts drawn for the global batch, SAR's DFT and ISEAT's ranks over the global batch, the AWP
    # direction of the global batch. Compared in float64: in float32 the sign steps of PGD flip where a gradient
    # entry is ~0 and rounding differs (batch statistics summed in another order), which after a few steps moves
    # the weights by 1e-2 in either precision's own noise.
    args = DDP_ARGS + METHOD_ARGS[method] + ["--epochs", "2", "--wa", "--wa-mode", "swa"]
    if method == "sar":  # extra images in every batch (a fraction), the DFT over the global mixed batch
        write_extra(tmp_path / "gen.npz", 40)
        args += ["--extra-data", str(tmp_path / "gen.npz"), "--extra-fraction", "0.25", "--data-dir",
                 str(tmp_path / "cache")]
    if method == "at":  # files on disk: rank 0 reads (or downloads) first, the others wait for it
        args += ["--dataset", "cifar10", "--data-dir", cifar[0]]
    single, _ = launch(tmp_path, method, args + ["--out", str(tmp_path / "single")], nproc=0, double=True,
                       cifar_root=cifar[0])
    states, out = launch(tmp_path, method, args + ["--sync-bn", "--out", str(tmp_path / "run")], double=True,
                         cifar_root=cifar[0])
    assert set(states) == {"0", "1"}
    assert_close_states(states["0"], states["1"])  # bitwise: gradients, AWP direction and buffers are shared
    assert_close_states(states["0"], single["single"], atol=1e-9)
    assert out.count("epoch 2 |") == 1 and "Grad strides" not in out  # only rank 0 prints; no gradient copies
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2]
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.equal(ck["model"][k], states["0"]["model"][k]) for k in ck["model"])
    if method == "sar":  # without --sync-bn only BatchNorm's statistics are per process: the weights differ
        per_rank, _ = launch(tmp_path, method, args + ["--out", str(tmp_path / "per_rank")], double=True)
        with pytest.raises(AssertionError):
            assert_close_states(per_rank["0"], single["single"], atol=1e-6)


@pytest.mark.slow
def test_torchrun_on_the_authors_networks_gives_the_one_process_result(tmp_path):
    """ISEAT (AWP on every conv and linear kernel) and TRADES on the SiLU WideResNet (BatchNorm momentum 0.01, its
    constants as buffers outside the state dict) and ISEAT's WideResNet: 2 processes = 1, as for the small CNN."""
    for method, arch in (("iseat", "wrn28_10_silu"), ("trades", "wrn34_10_iseat")):
        args = DDP_ARGS + ["--arch", arch, "--epochs", "2", "--batch-size", "8", "--val-size", "8", "--wa",
                           "--steps", "2", "--save-every", "1"]
        single, _ = launch(tmp_path, method, args + ["--out", str(tmp_path / f"single-{method}")], nproc=0,
                           double=True, small=True)
        states, out = launch(tmp_path, method, args + ["--sync-bn", "--out", str(tmp_path / f"run-{method}")],
                             double=True, small=True)
        assert_close_states(states["0"], states["1"])
        assert_close_states(states["0"], single["single"], atol=1e-9)
        assert os.path.exists(tmp_path / f"run-{method}" / "epoch_2.pt")


@pytest.mark.slow
def test_torchrun_without_batchnorm_matches_single_process_and_resumes(tmp_path):
    # no batch statistics: SAR (its DFT over the gathered global batch) on 2 processes is the one-process SAR, with
    # or without --sync-bn
    args = DDP_ARGS + ["--epochs", "2", "--wa"]
    ddp, _ = launch(tmp_path, "sar", args + ["--out", str(tmp_path / "ddp")], no_bn=True, double=True)
    single, _ = launch(tmp_path, "sar", args + ["--out", str(tmp_path / "single")], nproc=0, no_bn=True, double=True)
    assert_close_states(ddp["0"], single["single"], atol=1e-9)
    # resume under torchrun: 2 + 1 epochs equal 3 epochs straight
    straight, _ = launch(tmp_path, "at", DDP_ARGS + ["--epochs", "3", "--wa", "--out", str(tmp_path / "s")])
    launch(tmp_path, "at", DDP_ARGS + ["--epochs", "2", "--wa", "--out", str(tmp_path / "r")])
    resumed, out = launch(tmp_path, "at", DDP_ARGS + ["--epochs", "3", "--wa", "--resume",
                                                      "--out", str(tmp_path / "r")])
    assert "resuming" in out
    assert_close_states(straight["0"], resumed["0"])
    assert_close_states(resumed["0"], resumed["1"])


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_and_elastic_restarts(tmp_path):
    args = DDP_ARGS + ["--epochs", "3", "--wa"]
    one_node, _ = launch(tmp_path, "at", args + ["--out", str(tmp_path / "one")])
    # two "nodes" on this machine: two launchers, one process each, meeting at a c10d rendezvous on 127.0.0.1
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=test"]
    nodes = [launch(tmp_path, "at", args + ["--out", str(tmp_path / "two")], nproc=1, torchrun=rdzv, wait=False)
             for _ in range(2)]
    outs = [finish(p, 300) for p, _ in nodes]
    assert all(p.returncode == 0 for p, _ in nodes), outs[0][-3000:] + outs[1][-3000:]
    two = {**states_in(nodes[0][1]), **states_in(nodes[1][1])}
    assert set(two) == {"0", "1"}
    assert_close_states(one_node["0"], two["0"])  # bitwise: the same computation
    # a worker killed (SIGKILL) in the middle of epoch 2: torchrun restarts the group, every rank resumes from
    # last.pt, and the run ends with the weights of the uninterrupted one
    restarted, out = launch(tmp_path, "at", args + ["--resume", "--timeout", "30", "--out", str(tmp_path / "elastic")],
                            torchrun=["--standalone", "--max-restarts=3"], env={"DIE": "1:5"})
    assert "resuming" in out and "epoch 1" in out
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "elastic" / "log.jsonl")] == [1, 2, 3]
    assert_close_states(one_node["0"], restarted["0"])
    assert_close_states(one_node["0"], restarted["1"])
    # a node that loses its peer for good (no restarts): its process ends with one line, within --timeout
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=lost",
            "--max-restarts=0"]
    nodes = [launch(tmp_path, "at", args + ["--timeout", "20", "--out", str(tmp_path / "lost")], nproc=1,
                    torchrun=rdzv, env={"DIE": "1:2"}, wait=False) for _ in range(2)]
    outs = "".join(finish(p, 120) for p, _ in nodes)
    assert all(p.returncode != 0 for p, _ in nodes)
    assert outs.count("error: rank 0 lost contact with the other processes") == 1, outs[-3000:]


@pytest.mark.slow
def test_bench_mode_prints_throughput_and_keeps_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--bench", "--dataset", "synthetic", "--arch", "cnn", "--max-batches", "2", "--batch-size", "16",
             "--device", DEV]
    at.main(small)
    sar.main(small)
    trades.main(small)
    mart.main(small)
    iseat.main(small + ["--compile"])  # torch.compile (inductor) with the out-of-place perturbed forward
    out = capsys.readouterr().out
    assert out.count("benchmark:") == 5 and "compile=True" in out
    assert "train_sar" in out and "train_smooth" in out and out.count("train_kl") == 4  # the terms are on
    assert list(tmp_path.iterdir()) == []
    rates = [float(m) for m in __import__("re").findall(r"benchmark: ([\d.]+) images/s \(\w+\.py", out)]
    assert len(rates) == 5 and all(r > 0 for r in rates)
    # the forward-equivalents per image bench.py multiplies by (a forward 1, an input gradient 1, a parameter
    # gradient 2): counted on each method's objective with PGD-10, every forward outside the attack's 10 followed
    # by a parameter-gradient backward
    import bench
    for name, module in (("at", at), ("sar", sar), ("trades", trades), ("mart", mart), ("iseat", iseat)):
        model = models.get_model("cnn", 10).train()
        counted = {True: 0, False: 0}
        model.register_forward_hook(lambda m, i, o: counted.__setitem__(torch.is_grad_enabled(),
                                                                        counted[torch.is_grad_enabled()] + 1))
        kw = dict(lam=0.1) if name == "iseat" else {}
        getattr(module, f"{name}_objective")(model, torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,)), **kw)
        forwards = counted[True] + counted[False]
        assert bench.PASSES[name] == forwards + 10 + 2 * (counted[True] - 10), (name, counted)
    # bench.py's TFLOP/s: images/s x the forward's FLOPs (torch's counter) x the forward-equivalents
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        models.get_model("cnn", 10).eval()(torch.rand(1, 3, 32, 32))
    assert bench.gflop_per_image("cnn") == pytest.approx(flops.get_total_flops() / 1e9)
    r = bench.run_one("sar", "cnn", "fp32", 16, 2, DEV, in_process=True)
    assert r["tflops"] == pytest.approx(r["img_per_s"] * r["gflop_per_image"] * 26 / 1000, rel=1e-3)


def test_bench_networks_table_counts_every_network():
    """bench.py --networks: parameters and forward GFLOPs of every network (torch's FLOP counter on the meta device);
    the WideResNet layouts differ where the stride sits: ISEAT's conv1 runs at the block's input resolution."""
    import bench
    assert bench.gflop_per_image("wrn34_10_iseat") == pytest.approx(14.73, abs=0.005)
    assert bench.gflop_per_image("wrn34_10") == pytest.approx(13.32, abs=0.005)
    assert bench.gflop_per_image("wrn28_10_silu") == pytest.approx(bench.gflop_per_image("wrn28_10"))
    table = bench.main(["--networks"])
    assert all(f"| `{arch}` |" in table for arch in models.ARCHS)
    assert "| `wrn70_16_silu` | 266,796,506 | 77.5 |" in table and "| `wrn34_10_iseat` | 46,160,474 | 14.7 |" in table


@pytest.mark.slow
def test_bench_py_prints_the_speed_table_and_writes_json(tmp_path):
    import bench
    res = bench.main(["--quick", "--out", str(tmp_path / "bench.json"), "--device", DEV])
    saved = json.load(open(tmp_path / "bench.json"))
    assert saved["markdown"] == res["markdown"] and saved["device"] == res["device"]
    for method in ("at", "sar", "iseat", "trades", "mart"):
        r = saved["runs"][method]["cnn"]["fp32"]
        assert r["img_per_s"] > 0 and r["tflops"] > 0
        ratio = saved["ratios"][method]["cnn"]["fp32"]  # step time relative to at.py: at's images/s over its own
        assert ratio == pytest.approx(saved["runs"]["at"]["cnn"]["fp32"]["img_per_s"] / r["img_per_s"], rel=1e-2)
    assert saved["largest_batch"]["cnn"]["batch"] == 128
    assert "| cnn |" in res["markdown"] and "| iseat | cnn |" in res["markdown"]
    assert "(rough: from a few batches)" in res["markdown"]  # --quick's epoch time is an extrapolation
    assert bench.peak_of("NVIDIA H100 80GB HBM3", None) == (989.0, "H100")
    assert bench.peak_of("NVIDIA H100 PCIe", None) == (756.0, "H100 PCIe")
    assert bench.peak_of("NVIDIA H200", None)[0] == 989.0 and bench.peak_of("Some GPU", 123.0) == (123.0, "given")


# ---------------------------------------------------------------- the schedules, in each released script's convention

def test_schedules_follow_the_released_scripts_epoch_conventions(cifar, tmp_path, monkeypatch):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    def rice(t, epochs=200):  # train_cifar.py: lr_schedule(epoch + (i + 1) / len(batches)), epochs from 0
        return 0.1 if t / epochs < 0.5 else 0.01 if t / epochs < 0.75 else 0.001

    def trades_mart(epoch):  # train_trades_cifar10.py, MART's train_*.py: adjust_learning_rate at the start of
        lr = 0.1             # epoch = 1, 2, ...
        if epoch >= 75:
            lr = 0.1 * 0.1
        if epoch >= 90:
            lr = 0.1 * 0.01
        if epoch >= 100:
            lr = 0.1 * 0.001
        return lr

    def from_zero(epoch, drops):  # the SAR authors' main.py and ISEAT's train.py: epochs from 0, `epoch >= drop`
        return 0.1 * 0.1 ** sum(epoch >= d for d in drops)

    a, nb = at.get_args([]), 383
    for epoch in range(200):
        for i in (0, nb - 2, nb - 1):
            t = epoch + (i + 1) / nb
            assert at.schedule(a, t, opt)[0] == pytest.approx(rice(t)), (epoch, i)
    for module in (trades, mart):
        a = module.get_args(["--released"])
        assert [module.schedule(a, e - 1, opt)[0] for e in range(1, 77)] == pytest.approx([trades_mart(e) for e in
                                                                                     range(1, 77)])
        a = module.get_args(["--released", "--epochs", "120"])  # MART's ResNet-18 script: 120 epochs
        assert [module.schedule(a, e - 1, opt)[0] for e in range(1, 121)] == pytest.approx([trades_mart(e) for e in
                                                                                      range(1, 121)])
    a = sar.get_args([])
    assert [sar.schedule(a, e, opt)[0] for e in range(100)] == pytest.approx([from_zero(e, (75, 90)) for e in range(100)])
    a = iseat.get_args([])
    assert [iseat.schedule(a, e, opt)[0] for e in range(200)] == pytest.approx([from_zero(e, (100, 150))
                                                                           for e in range(200)])
    # at.py sets the lr before every step, as Rice et al.: the last step of the epoch before a milestone already
    # runs at the lower lr (4 epochs, milestones 2 and 3 = Rice's 1/2 and 3/4 of the run)
    lrs = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *x, **k: lrs.append(self.param_groups[0]["lr"])
                        or real_step(self, *x, **k))
    root, _ = cifar
    at.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "4", "--milestones", "2", "3",
             "--batch-size", "32", "--max-batches", "2", "--val-size", "40", "--steps", "1", "--out",
             str(tmp_path / "r"), "--device", DEV])
    assert lrs == pytest.approx([rice(e + (i + 1) / 2, epochs=4) for e in range(4) for i in range(2)])
    assert lrs[:4] == pytest.approx([0.1, 0.1, 0.1, 0.01])


# ---------------------------------------------------------------- the leaderboard's recipe (--recipe wang2023)

def recipe_args(root, out, *extra):
    return ["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--recipe", "wang2023", "--batch-size", "8",
            "--val-size", "8", "--val-steps", "2", "--steps", "2", "--max-batches", "1", "--out", str(out),
            "--device", DEV, *extra]


def test_recipe_sets_the_released_values_and_the_flags_given_win():
    a = trades.get_args(["--recipe", "wang2023", "--extra-data", "1m.npz"])
    assert (a.batch_size, a.lr, a.epochs, a.milestones, a.extra_fraction, a.val_size, a.val_steps, a.val_loss, a.wa,
            a.wa_mode, a.wa_decay, a.beta, a.label_smoothing) == (512, 0.2, 400, [], 0.7, 1024, 40, "cw", True,
                                                                 "wang2023", 0.995, 5.0, 0.1)
    a = trades.get_args(["--recipe", "wang2023", "--batch-size", "256", "--beta", "6", "--epochs", "10"])
    assert (a.batch_size, a.beta, a.epochs, a.extra_fraction, a.label_smoothing) == (256, 6.0, 10, None, 0.1)
    a = sar.get_args(["--recipe", "wang2023"])  # every method: the shared values, not TRADES' own
    assert (a.lr, a.wa_mode, a.sar_lambda) == (0.2, "wang2023", 0.1) and not hasattr(a, "beta")
    assert iseat.get_args(["--recipe", "wang2023"]).lam == [0.1]  # one-cycle: no lr stages, the smoothing on
    assert at.get_args([]).recipe is None and at.get_args([]).momentum == 0.9 and at.get_args([]).val_loss == "ce"
    one_line_error(at.main, "--recipe", "wang2023", "--momentum", "0.9", match=r"cycles the momentum \(leave --momentum")
    one_line_error(at.main, "--recipe", "wang2023", "--epochs", "40", match=r"divides by zero at --epochs 40")
    one_line_error(trades.main, "--recipe", "wang2023", "--norm", "L2", match=r"--recipe wang2023 with --norm L2")


def test_recipe_schedule_is_torchs_one_cycle_stepped_once_an_epoch(cifar, tmp_path, monkeypatch):
    """Every epoch's lr and momentum are OneCycleLR's (max_lr --lr, pct_start 0.025, total_steps --epochs) after
    that many steps, in one process and across a resume at any epoch; at.py does not change the lr within an epoch
    under the recipe; Nesterov on, BatchNorm's weights and biases without weight decay, every other parameter (the
    linear bias too) with --wd."""
    for epochs in (1, 3, 39, 41, 400):
        a = at.get_args(["--recipe", "wang2023", "--epochs", str(epochs), "--lr", "0.3"])
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3, momentum=0.9)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, pct_start=0.025, total_steps=epochs)
        mine = torch.optim.SGD(models.param_groups(models.get_model("cnn", 10), bn_weight_decay=0.0), lr=1.0)
        for e in range(epochs):
            want = (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"])
            assert at.schedule(a, e, mine) == want and all((g["lr"], g["momentum"]) == want for g in mine.param_groups)
            opt.step()
            ref.step()
    root, _ = cifar
    seen = []  # (lr, momentum, nesterov, weight decay) of each group at every optimiser step
    real_step, real_batches = torch.optim.SGD.step, data.batches

    def step(self, *args, **kw):
        if len(self.param_groups) == 2:  # the training's (schedule's stand-in has one)
            seen.append([(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) for g in self.param_groups])
        return real_step(self, *args, **kw)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    for kill in (None, 1, 3):  # uninterrupted; killed in epoch 2 and resumed; killed in epoch 4 and resumed
        seen.clear()
        out = tmp_path / f"run{kill}"
        args = recipe_args(root, out, "--max-batches", "2", "--wd", "3e-4", "--epochs", "5")
        if kill:
            def dying(*a, **kw):  # the epoch's seed is the epoch here (--seed 0)
                if kw.get("seed") == kill:
                    raise KeyboardInterrupt
                return real_batches(*a, **kw)
            monkeypatch.setattr(data, "batches", dying)
            with pytest.raises(KeyboardInterrupt):
                at.main(args)
            monkeypatch.setattr(data, "batches", real_batches)
            args += ["--resume"]
        at.main(args)
        a = at.get_args(args)
        want = [at.schedule(a, e, torch.optim.SGD([torch.zeros(1)], lr=1.0)) for e in range(5)]
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        assert [v for r in log for v in (r["lr"], r["momentum"])] == pytest.approx(  # the log: 6 digits
            [v for w in want for v in w], rel=1e-5)
        assert [v for s in seen for v in s[0][:2]] == pytest.approx(  # both steps of each epoch
            [v for w in want for _ in range(2) for v in w])
    assert len({s[0][0] for s in seen}) == 5  # the lr moves once an epoch
    assert all(g[2] for s in seen for g in s)  # Nesterov
    assert all(s[0][3] == 3e-4 and s[1][3] == 0.0 for s in seen)  # BatchNorm's group without weight decay
    net = models.get_model("cnn", 10)
    groups = models.param_groups(net, bn_weight_decay=0.0)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in groups[1]["params"]) == sorted(
        f"bn{i}.{w}" for i in range(1, 5) for w in ("weight", "bias"))
    assert "linear.bias" in [names[id(p)] for p in groups[0]["params"]]  # decayed, as released
    assert len(models.param_groups(net)) == 1 and len(groups[0]["params"]) + len(groups[1]["params"]) == len(names)


def test_recipe_ema_is_the_released_formula_and_takes_the_live_batchnorm_statistics(cifar, tmp_path, monkeypatch):
    """wang2023's EMA against a slow loop of the released ema_update over a run whose warm-up (here 5.2 steps) ends
    inside it: decay 0 until the warm-up, then min(0.995, (1 + d) / (10 + d)); parameters only; the average's
    BatchNorm buffers are the live model's."""
    root, _ = cifar
    monkeypatch.setitem(data.TRAIN_IMAGES, "cifar10", 200)  # the fixture's size: W = 0.025 x 8 x (200 // 8 + 1) = 5.2
    states = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kw):
        if len(self.param_groups) == 1:  # schedule's stand-in
            return real_step(self, *args, **kw)
        params = self.param_groups[0]["params"] + self.param_groups[1]["params"]
        if not states:
            states.append([p.detach().clone() for p in params])
        out = real_step(self, *args, **kw)
        states.append([p.detach().clone() for p in params])
        return out
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    out = tmp_path / "ema"
    at.main(recipe_args(root, out, "--epochs", "8"))
    ck = torch.load(out / "last.pt", weights_only=True)
    model = models.get_model("cnn", 10)
    order = [id(p) for g in models.param_groups(model, bn_weight_decay=0.0) for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    names = [names[i] for i in order]
    warmup = 0.025 * 8 * (200 // 8 + 1)
    avg = [t.clone().double() for t in states[0]]  # the release's deep copy of the initial model
    for step_no, live in enumerate(states[1:], start=1):  # ema_update(wa_model, model, global_step, 0.995, warmup)
        factor = int(step_no >= warmup)
        delta = step_no - warmup
        decay = min(0.995, (1. + delta) / (10. + delta)) * factor
        avg = [decay * a + (1 - decay) * p.double() for a, p in zip(avg, live)]
    assert len(states) == 9 and 5 < warmup < 8
    for n, a in zip(names, avg):
        assert torch.allclose(ck["wa_model"][n].double(), a, atol=1e-6), n
    assert not torch.allclose(ck["wa_model"][names[0]], ck["model"][names[0]])  # averaged, not the live weights
    for k, v in ck["model"].items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(ck["wa_model"][k], v), k
    assert ck["wa_n"] == 9  # the optimiser steps taken + 1: the release's global_step of the next update
    assert os.path.exists(out / "wa_best.pt")


def test_recipe_first_step_takes_batchnorm_momentum_1(cifar, tmp_path, monkeypatch):
    """As released: the first step's BatchNorm updates run with momentum 1.0 (the statistics become the last
    train-mode batch's), every later one with the network's own (0.1 here; the SiLU network's 0.01)."""
    root, _ = cifar
    seen = []
    real_bn = F.batch_norm

    def bn(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if training and running_mean is not None:
            seen.append((momentum, x.detach().mean((0, 2, 3)).clone()))
        return real_bn(x, running_mean, running_var, weight, bias, training, momentum, eps)
    monkeypatch.setattr(F, "batch_norm", bn)
    out = tmp_path / "bn"
    trades.main(recipe_args(root, out, "--epochs", "1", "--max-batches", "2"))
    bn_layers = 4  # the small CNN's
    first, second = seen[:2 * bn_layers], seen[2 * bn_layers:4 * bn_layers]  # a step: the clean and the adversarial
    assert [m for m, _ in first] == [1.0] * len(first) and [m for m, _ in second] == [0.1] * len(second)
    assert models.get_model("cnn", 10).bn1.momentum == 0.1


def test_dm_trades_attack_uses_batch_statistics_and_leaves_the_running_ones(monkeypatch):
    """trades_attack(dm=True), DM-Improves-AT's: train mode, each forward normalised by its own batch's statistics
    (the running ones neither used nor updated), target softmax f(x) computed so, start x + U(-eps, eps) clipped,
    sign steps on the KL; against a slow loop with BatchNorm by hand. It would fail in eval mode (the running
    statistics, random here, would normalise) or if the statistics moved."""
    torch.manual_seed(0)
    model = models.get_model("cnn", 10).to(DEV).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    before = copy.deepcopy(model.state_dict())
    x = torch.rand(6, 3, 12, 12, device=DEV)
    u = torch.rand_like(x)
    got = trades.trades_attack(model, x, 8 / 255, 2 / 255, 3, noise=u, dm=True)
    assert not model.training and all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing moved

    def forward(inp):  # the small CNN by hand, BatchNorm with the batch's own mean and (biased) variance
        sd, h = model.state_dict(), inp
        for i, stride in ((1, 1), (2, 2), (3, 1), (4, 2)):
            h = F.conv2d(h, sd[f"conv{i}.weight"], stride=stride, padding=1)
            mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
            h = (h - mean) / torch.sqrt(var + 1e-5) * sd[f"bn{i}.weight"][:, None, None] + sd[f"bn{i}.bias"][:, None,
                                                                                                       None]
            h = F.relu(h)
        return F.linear(F.adaptive_avg_pool2d(h, 4).flatten(1), sd["linear.weight"], sd["linear.bias"])
    with torch.no_grad():
        target = F.softmax(forward(x), dim=1)
    want = (x + (2 * u - 1) * 8 / 255).clamp(0, 1)
    for _ in range(3):
        want.requires_grad_(True)
        kl = (target * (target.log() - F.log_softmax(forward(want), dim=1))).sum()
        (g,) = torch.autograd.grad(kl, want)
        want = torch.min(torch.max(want.detach() + 2 / 255 * g.sign(), x - 8 / 255), x + 8 / 255).clamp(0, 1)
    assert (got - want).abs().max() < 1e-6
    model.bn1.track_running_stats = False  # each layer's flag is given back as it was
    trades.trades_attack(model, x, 8 / 255, 2 / 255, 1, noise=u, dm=True)
    assert not model.bn1.track_running_stats and model.bn2.track_running_stats
    model.bn1.track_running_stats = True
    eval_mode = trades.trades_attack(model, x, 8 / 255, 2 / 255, 3, noise=torch.randn_like(x))  # the original
    assert not model.training and (eval_mode - got).abs().max() > 1e-3


def test_cw_validation_matches_a_slow_loop():
    """attacks.accuracy with loss="cw" (the recipe's validation, PGD-40 on the margin): each image's result equals a
    per-image loop of sign steps on max_{j != y} z_j - z_y written out class by class."""
    torch.manual_seed(1)
    model = models.get_model("cnn", 10).to(DEV)
    model.train()
    x, y = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8, device=DEV), torch.randint(0, 10, (10,), device=DEV)
    torch.manual_seed(7)
    clean, robust = attacks.accuracy(model, x, y, 8 / 255, 2 / 255, 5, loss="cw")
    assert model.training  # restored
    model.eval()
    torch.manual_seed(7)
    xf = x.float() / 255
    u = torch.rand_like(xf)  # pgd's draw for the chunk
    survived = []
    for i in range(len(y)):
        xi, yi = xf[i:i + 1], int(y[i])
        xa = (xi + (u[i:i + 1] * 2 - 1) * 8 / 255).clamp(0, 1)
        for _ in range(5):
            xa.requires_grad_(True)
            z = model(xa)[0]
            margin = max(z[j] for j in range(10) if j != yi) - z[yi]
            (g,) = torch.autograd.grad(margin, xa)
            xa = (xi + (xa.detach() + 2 / 255 * g.sign() - xi).clamp(-8 / 255, 8 / 255)).clamp(0, 1)
        with torch.no_grad():
            survived.append(model(xa).argmax(1).item() == yi)
    assert robust == pytest.approx(100 * sum(survived) / len(y))
    torch.manual_seed(7)
    per_image = attacks.correct(model, x, y, attack=attacks.pgd, eps=8 / 255, alpha=2 / 255, steps=5, loss="cw")
    assert per_image.tolist() == survived and 0 < sum(survived) < len(y)
    with torch.no_grad():
        assert clean == pytest.approx(100 * (model(xf).argmax(1) == y).float().mean().item())


@pytest.mark.slow
def test_torchrun_with_the_recipe_gives_the_one_process_result(tmp_path):
    """The whole recipe on 2 processes (--sync-bn) = 1 process: one-cycle lr and momentum, Nesterov and the BatchNorm
    group, BatchNorm momentum 1.0 at the first step, DM's TRADES attack on batch statistics of the global batch, the
    wang2023 EMA; in float64."""
    args = DDP_ARGS + ["--recipe", "wang2023", "--epochs", "3", "--val-size", "50", "--val-steps", "2"]
    single, _ = launch(tmp_path, "trades", args + ["--out", str(tmp_path / "single")], nproc=0, double=True)
    states, out = launch(tmp_path, "trades", args + ["--sync-bn", "--out", str(tmp_path / "run")], double=True)
    assert_close_states(states["0"], states["1"])
    assert_close_states(states["0"], single["single"], atol=1e-9)
    assert "wa=wang2023" in out and out.count("epoch 3 |") == 1


# ---------------------------------------------------------------- each method as one copyable function

COPY_PRELUDE = "import contextlib\nimport torch\nimport torch.nn.functional as F\nfrom torch.func import functional_call\n"
METHOD_FUNCTIONS = {"at": ["at_objective"], "sar": ["sar_objective"], "iseat": ["iseat_objective", "awp_perturbed"],
                    "trades": ["trades_objective"], "mart": ["mart_objective"]}


def global_names(code):
    import dis
    import types
    out = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= global_names(c)
    return out


def copied(module, names):
    """What a user copies: the named functions' source and that of every function they name (from their file and
    attacks.py), executed in a fresh namespace that holds torch alone (with torch.nn.functional as F,
    torch.func.functional_call and contextlib). Fails if they name anything else. Returns (namespace, lines)."""
    import inspect
    allowed = {"torch", "F", "functional_call", "contextlib", "len", "max", "min", "sum", "range", "zip", "dict",
               "list", "float", "ValueError", "isinstance", "enumerate", "sorted"}
    sources, todo = {}, [getattr(module, n) for n in names]
    while todo:
        fn = inspect.unwrap(todo.pop())
        if fn.__name__ in sources:
            continue
        sources[fn.__name__] = inspect.getsource(getattr(sys.modules[fn.__module__], fn.__name__))
        for g in global_names(fn.__code__):
            obj = fn.__globals__.get(g)
            if g in allowed and g not in fn.__globals__ or g in ("torch", "F", "functional_call", "contextlib"):
                continue
            assert inspect.isfunction(obj) and obj.__module__ in (module.__name__, "attacks"), \
                f"{fn.__name__} names {g}, which a copy would not have"
            todo.append(obj)
    ns = {}
    exec(COPY_PRELUDE, ns)
    for src in sources.values():
        exec(src, ns)
    return ns, sum(len(s.splitlines()) for s in sources.values())


def foreign_loop(ns, method, compiled=False, steps=3):
    """A training loop that is not this project's: a small Sequential with BatchNorm, its own data and optimiser,
    gradient clipping; the method enters only as its copied function."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(32, 10))
    before = copy.deepcopy(net.state_dict())
    model = torch.compile(net) if compiled else net
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
        model.train()
        out = ns[METHOD_FUNCTIONS[method][0]](model, x, y)  # the method's defaults
        loss = out[0]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        if method == "iseat":
            with ns["awp_perturbed"](model, out[3], 7e-3):
                opt.step()
        else:
            opt.step()
        losses.append(loss.item())
    return losses, before, net.state_dict()


@pytest.mark.parametrize("method", ["at", "sar", "iseat", "trades", "mart"])
def test_method_is_one_copyable_function_and_is_the_scripts_step(cifar, tmp_path, monkeypatch, method):
    module = sys.modules[method]
    ns, lines = copied(module, METHOD_FUNCTIONS[method])
    assert lines < 150, lines
    losses, before, after = foreign_loop(ns, method, compiled=method == "at")
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    # the script's own step is the function: record its first call in sar.py/...'s loop (network state before it,
    # the batch, the settings) and the gradients the loop hands to the optimiser; the copy, given the same, gives
    # the same loss and gradients
    name = METHOD_FUNCTIONS[method][0]
    real, calls, grads = getattr(module, name), [], []

    def spy(net, *a, **k):
        if not calls:
            calls.append((copy.deepcopy(net.state_dict()), a, k))
        out = real(net, *a, **k)
        if len(calls) == 1:
            calls.append(out[0].detach())
        return out
    monkeypatch.setattr(module, name, spy)
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *x, **k: grads.append(
        [p.grad.clone() for p in self.param_groups[0]["params"]]) or real_step(self, *x, **k))
    extra = {"iseat": ["--lam", "0.1"], "sar": []}.get(method, [])
    module.main(["--dataset", "cifar10", "--data-dir", cifar[0], "--arch", "cnn", "--epochs", "1", "--milestones",
                 "--batch-size", "16", "--max-batches", "1", "--val-size", "40", "--out", str(tmp_path / "r"),
                 "--device", DEV] + extra)
    state, a, k = calls[0]
    net = models.get_model("cnn", 10).to(DEV)
    net.load_state_dict(state)
    net.train()
    out = ns[name](net, *a, **k)
    net.zero_grad()
    out[0].backward()
    assert abs(out[0].item() - calls[1].item()) < 1e-6
    for p, g in zip(net.parameters(), grads[0]):
        assert torch.allclose(p.grad, g, atol=1e-6), method


@pytest.mark.slow
def test_torchrun_grey_images_make_no_gradient_copies(tmp_path):
    # a grey-image network's first conv is 16 x 1 x 3 x 3: a gradient that sums two forwards' contributions (SAR's
    # adversarial and clean branches) got strides other than its parameter's in that size-1 dimension, and DDP
    # warned "Grad strides do not match bucket view strides" and copied it at every step. Gradients now stay in
    # DDP's buckets between steps.
    write_mnist_like(tmp_path / "mnist", n_train=120, n_test=12)
    _, out = launch(tmp_path, "sar", ["--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--arch", "cnn",
                                      "--epochs", "1", "--milestones", "--batch-size", "32", "--max-batches", "2",
                                      "--val-size", "20", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert "epoch 1 |" in out and "Grad strides" not in out


def test_awp_step_at_the_perturbed_point_differs_only_through_weight_decay():
    # the gradient is taken before the step, so with SGD the step at theta + gamma v, once the perturbation is
    # removed, is the step at theta, unless weight decay (which sees theta + gamma v) is on: then the first step
    # differs by exactly -lr * wd * gamma * v
    torch.manual_seed(0)
    x, y = torch.rand(12, 3, 8, 8), torch.randint(0, 10, (12,))
    after, gamma, lr = {}, 7e-3, 0.1
    for wd in (0.0, 0.05):
        for perturbed in (True, False):
            torch.manual_seed(1)
            model = models.get_model("cnn", 10).train()
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
            torch.manual_seed(2)
            loss, _, _, v = iseat.iseat_objective(model, x, y, lam=0.1)
            opt.zero_grad()
            loss.backward()
            with iseat.awp_perturbed(model, v, gamma if perturbed else 0.0):
                opt.step()
            after[wd, perturbed] = {k: t.clone() for k, t in model.state_dict().items()}
    for k in after[0.0, True]:
        assert torch.allclose(after[0.0, True][k].float(), after[0.0, False][k].float(), atol=1e-7), k
    for k in v:
        assert torch.allclose(after[0.05, True][k] - after[0.05, False][k], -lr * 0.05 * gamma * v[k], atol=1e-7), k
        assert (-lr * 0.05 * gamma * v[k]).abs().max() > 1e-6  # well above the tolerance


@pytest.mark.slow
def test_autoattack_resumes_inside_a_component_and_equals_the_standard_evaluation(tmp_path, monkeypatch):
    from pyautoattack import AutoAttack
    torch.manual_seed(0)
    model = models.get_model("cnn", 10).to(DEV).eval()
    x = torch.rand(24, 3, 16, 16, device=DEV)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image starts correct
    eps = 6 / 255  # APGD-CE breaks some of them, not all
    with attacks.frozen(model), torch.random.fork_rng():  # the library's standard evaluation, uninterrupted
        x_adv, _ = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=x.device,
                              seed=0).run_standard_evaluation(x, y, batch_size=24)
        with torch.no_grad():
            want = (model(x_adv).argmax(1) == y).cpu()
    # killed inside APGD-T: what APGD-CE found is kept; the same call continues with APGD-T
    real, saved = evaluate._aa_component, []

    def dying(adversary, attack, xb, yb):
        if attack == "apgd-t":
            raise KeyboardInterrupt
        return real(adversary, attack, xb, yb)
    state = {}
    monkeypatch.setattr(evaluate, "_aa_component", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate.autoattack(model, x, y, eps, batch_size=24, state=state,
                           save=lambda: saved.append(copy.deepcopy(state)))
    assert [s["done"] for s in saved] == [["apgd-ce"]] and 0 < int(saved[-1]["robust"].sum()) < 24
    ran = []
    monkeypatch.setattr(evaluate, "_aa_component", lambda a, name, xb, yb: ran.append(name) or real(a, name, xb, yb))
    got = evaluate.autoattack(model, x, y, eps, batch_size=24, state=saved[-1])
    assert ran[0] == "apgd-t" and "apgd-ce" not in ran  # APGD-CE is not run again
    assert torch.equal(got.cpu(), want)  # the per-image result of the uninterrupted standard evaluation
    assert saved[-1]["done"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # the time left in a chunk, from the per-image rates of the components in the chunks before
    import re
    logs, rates = [], {}
    evaluate.autoattack(model, x, y, eps, batch_size=24, log=logs.append, rates=rates)
    assert "time left known after the first images" in logs[0] and "apgd-ce" in rates
    logs.clear()
    evaluate.autoattack(model, x, y, eps, batch_size=24, log=logs.append, rates=rates)
    assert re.fullmatch(r"  AutoAttack apgd-ce: \d+/24 images still robust, \d+ s, ~\d+ s left in these 24 images",
                        logs[0]), logs


def test_report_puts_a_row_on_the_same_images():
    import report

    def r(name, n, acc, date="2026-01-01"):
        return {f"{name}|{n}|{date}": dict(name=name, attack=name.upper(), accuracy=acc, n_examples=n, date=date)}
    # PGD and the worst case on 1,000 images, AutoAttack on 100 and on 1,000: the row is on 1,000 images
    res = {**r("clean", 1000, 80.0), **r("pgd", 1000, 50.0), **r("aa", 100, 40.0), **r("aa", 1000, 45.0),
           **r("worst", 100, 39.0), **r("worst", 1000, 44.0)}
    row, n = report.pick_row(res)
    assert n == 1000 and row["aa"]["accuracy"] == 45.0 and row["worst"]["accuracy"] == 44.0
    # AutoAttack on 100 only: the largest set every attack shares is 100, and the worst case over it is shown
    res = {**r("clean", 1000, 80.0), **r("clean", 100, 81.0), **r("pgd", 1000, 50.0), **r("pgd", 100, 52.0),
           **r("aa", 100, 40.0), **r("worst", 1000, 49.0), **r("worst", 100, 39.0)}
    row, n = report.pick_row(res)
    assert n == 100 and row["pgd"]["accuracy"] == 52.0 and row["worst"]["accuracy"] == 39.0
    # no set common to all: each attack on its most images, and the table says which cells are on other images
    res = {**r("pgd", 1000, 50.0), **r("worst", 1000, 49.0), **r("aa", 100, 40.0)}
    row, n = report.pick_row(res)
    assert n == 1000 and row["aa"]["n_examples"] == 100
    md, _ = report.table([dict(run="r", checkpoint="best", method="at", network="cnn", dataset="cifar10",
                               epochs="1/1", epoch=1, val_clean=None, val_pgd=None, val_attack="", n_row=n, **row)])
    assert "40.00 (other images: first 100)" in md and "50.00 |" in md
    # attacks at two radii: the row shows one, the training radius where it was evaluated, else the most results
    res = {**r("clean", 100, 80.0), **{k: dict(v, eps=8 / 255, norm="Linf") for k, v in r("pgd", 100, 50.0).items()},
           **{k: dict(v, eps=4 / 255, norm="Linf") for k, v in {**r("pgd", 100, 60.0, "2026-02-01"),
                                                                  **r("cw", 100, 59.0)}.items()}}
    assert report.pick_row(res, train_eps=8 / 255)[0]["pgd"]["accuracy"] == 50.0
    row, _ = report.pick_row(res, train_eps=0)
    assert row["pgd"]["accuracy"] == 60.0 and row["cw"]["accuracy"] == 59.0 and row["clean"]["accuracy"] == 80.0


# ---------------------------------------------------------------- each method file is the whole program

METHOD_FILES = ("at.py", "sar.py", "iseat.py", "trades.py", "mart.py")
HERE = os.path.dirname(os.path.abspath(__file__))


def shared_blocks(path):
    """The run code a method file marks as shared: {name: text}, from '# ---- shared run code: NAME ----' to the next
    '# ---- end shared ----' at the same indentation."""
    import re
    text = open(os.path.join(HERE, path)).read()
    blocks = re.findall(r"^( *)# ---- shared run code: (.+?) ----\n(.*?)^\1# ---- end shared ----\n", text, re.S | re.M)
    names = [name for _, name, _ in blocks]
    assert len(names) == len(set(names)), (path, names)
    return {name: indent + body for indent, name, body in blocks}


def test_shared_run_code_is_the_same_block_in_every_method_file():
    reference = shared_blocks("at.py")
    assert set(reference) == {"the flags", "set-up", "the epoch's start", "the end of the epoch", "the end of the run",
                              "helpers"}
    assert sum(len(b.splitlines()) for b in reference.values()) > 200  # the run really is in the file
    for path in METHOD_FILES[1:]:
        blocks = shared_blocks(path)
        assert set(blocks) == set(reference), path
        for name, body in reference.items():
            if blocks[name] != body:  # name the first line that drifted
                import difflib
                diff = "\n".join(list(difflib.unified_diff(body.splitlines(), blocks[name].splitlines(), "at.py", path,
                                                           lineterm=""))[:12])
                raise AssertionError(f"the shared block '{name}' of {path} differs from at.py's:\n{diff}")
    # a block that drifted is caught: the check itself can fail
    drifted = {**reference, "set-up": reference["set-up"].replace("world > 1", "world >= 1", 1)}
    assert drifted != reference


def test_method_files_stay_within_their_line_budgets():
    """A method file is read top to bottom and its run code is written five times: at.py at most 335 lines, the
    others 435, the shared run code 235, `main` 135 (the leaderboard's recipe included)."""
    import ast
    for path in METHOD_FILES:
        text = open(os.path.join(HERE, path)).read()
        main = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "main")
        shared = sum(len(b.splitlines()) for b in shared_blocks(path).values())
        lines = len(text.splitlines())
        assert lines <= (335 if path == "at.py" else 435) and shared <= 235, (path, lines, shared)
        assert main.end_lineno - main.lineno + 1 <= 135, path
        assert max(len(line) for line in text.splitlines()) <= 120, path


def test_method_files_import_only_the_four_shared_modules():
    import ast
    own = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")}
    for path in METHOD_FILES:
        tree = ast.parse(open(os.path.join(HERE, path)).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert names & own <= {"models", "data", "attacks", "wa"}, (path, names & own)


@pytest.mark.slow
def test_a_method_file_with_the_four_modules_runs_anywhere(tmp_path):
    # a whole-file copy: sar.py with models.py, data.py, attacks.py and wa.py in an empty folder, nothing else on the
    # path: training with a weight average, --resume, and --bench (which printed "No module named 'bench'" before)
    import shutil
    for f in ("sar.py", "models.py", "data.py", "attacks.py", "wa.py"):
        shutil.copy(os.path.join(HERE, f), tmp_path / f)
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="2")
    run = lambda *a: subprocess.run([sys.executable, "sar.py", "--dataset", "synthetic", "--arch", "cnn",  # noqa
                                     "--batch-size", "16", "--max-batches", "2", "--device", "cpu", *a],
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    r = run("--bench", "--wa")
    assert r.returncode == 0 and "benchmark:" in r.stdout and " images/s (sar.py" in r.stdout, r.stderr[-2000:]
    r = run("--epochs", "1", "--milestones", "--wa", "--val-size", "20", "--out", "run")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("--epochs", "2", "--milestones", "--wa", "--val-size", "20", "--out", "run", "--resume")
    assert r.returncode == 0 and "resuming run/last.pt at epoch 1" in r.stdout, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "run")) == ["best.pt", "last.pt", "log.jsonl", "wa_best.pt"]
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2]


def test_copied_functions_in_foreign_settings():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    # rank_weights builds its weights in one dtype, also under float64 as torch's default
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = iseat.rank_weights(torch.tensor([0.3, -1.0, 2.0, 0.3]))
    finally:
        torch.set_default_dtype(old)
    assert w.tolist() == [2 / 4, 1 / 4, 4 / 4, 3 / 4] and w.dtype == torch.float64
    # awp_perturbed takes the network with or without its wrapper: the names of v may carry DDP's "module." prefix
    inner = models.get_model("cnn", 10).train()

    class Wrapper(nn.Module):  # names its parameters as DistributedDataParallel does: module.<name>
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)
    wrapped = Wrapper(inner)
    _, _, _, v = iseat.iseat_objective(wrapped, x, y, steps=1)
    assert all(n.startswith("module.") for n in v)
    before = {k: t.clone() for k, t in inner.state_dict().items()}
    with iseat.awp_perturbed(inner, v, 7e-3):  # the inner module, the wrapper's names
        moved = [n for n, t in inner.state_dict().items() if not torch.equal(t, before[n])]
    assert sorted(moved) == sorted(n[len("module."):] for n in v)
    assert all(torch.equal(t, before[n]) for n, t in inner.state_dict().items())  # back, bitwise
    with pytest.raises(ValueError, match="nn.DataParallel cannot run the perturbed forward.*pass model.module"):
        iseat.iseat_objective(nn.DataParallel(inner), x, y, steps=1)
    # sar_objective, trades_objective and mart_objective leave the network in the mode they were given
    for objective in (sar.sar_objective, trades.trades_objective, mart.mart_objective):
        for mode in (False, True):
            inner.train(mode)
            objective(inner, x, y, steps=1)
            assert inner.training == mode, (objective.__name__, mode)


# ---------------------------------------------------------------- L2, end to end

def released_trades_l2(model, x, eps, step, steps):
    """The released TRADES attack's L2 branch, as written there: delta optimised by SGD (lr = the step) on minus the
    summed KL, its gradient divided by its norm per image, then the box and renorm to the ball."""
    model.eval()
    delta = (0.001 * torch.randn_like(x)).requires_grad_(True)
    opt = torch.optim.SGD([delta], lr=step)
    for _ in range(steps):
        opt.zero_grad()
        loss = -1 * nn.KLDivLoss(reduction="sum")(F.log_softmax(model(x + delta), dim=1), F.softmax(model(x), dim=1))
        loss.backward()
        norms = delta.grad.view(len(x), -1).norm(p=2, dim=1)
        delta.grad.div_(norms.view(-1, 1, 1, 1))
        opt.step()
        delta.data.add_(x)
        delta.data.clamp_(0, 1).sub_(x)
        delta.data.renorm_(p=2, dim=0, maxnorm=eps)
    return (x + delta).detach()


def test_l2_attacks_and_the_unit_ball_start():
    torch.manual_seed(0)
    model = models.get_model("cnn", 10).to(DEV).eval()
    x, y = torch.rand(8, 3, 12, 12, device=DEV), torch.randint(0, 10, (8,), device=DEV)
    torch.manual_seed(5)
    want = released_trades_l2(model, x, 0.5, 0.1, 5)
    torch.manual_seed(5)
    got = trades.trades_attack(model, x, 0.5, 0.1, 5, norm="L2")
    assert torch.allclose(got, want, atol=2e-5)  # the same steps; rounding (the box taken on x + delta) grows ~1e-6 a step
    for x_adv in (got, mart.mart_attack(model, x, y, 0.5, 0.1, 5, norm="L2"),
                  attacks.pgd(model, x, y, 0.5, 0.1, 5, norm="L2")):
        assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv - x).abs().max() > 0.1  # an L2 step, not an L-inf one of 2/255
    # the L2 random start: a uniform direction at a radius uniform in [0, 1] per image, drawn for the global batch
    xs, ys = torch.zeros(4000, 3, 4, 4, dtype=torch.uint8), torch.zeros(4000, dtype=torch.long)
    (_, _, z), = data.batches(xs, ys, 4000, noise=data.unit_ball, seed=3)
    r = z.flatten(1).norm(dim=1)
    assert r.max() <= 1 + 1e-6 and abs(r.mean().item() - 0.5) < 0.02 and abs((r < 0.25).float().mean() - 0.25) < 0.03
    assert abs(z.mean().item()) < 0.01  # no preferred direction
    halves = [b[2] for k in (0, 1)
              for b in data.batches(xs[:10], ys[:10], 10, noise=data.unit_ball, seed=3, rank=k, world=2)]
    (_, _, whole), = data.batches(xs[:10], ys[:10], 10, noise=data.unit_ball, seed=3)
    assert torch.equal(torch.cat(halves), whole)
    # pgd's L2 start from the caller's draw: x + eps * z (then the box)
    zero_steps = attacks.pgd(model, x, y, 0.5, 0.1, 0, norm="L2", noise=z[:8, :, :4, :4].repeat(1, 1, 3, 3))
    assert torch.allclose(zero_steps, (x + 0.5 * z[:8, :, :4, :4].repeat(1, 1, 3, 3)).clamp(0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["at", "sar", "iseat", "trades", "mart"])
def test_each_method_trains_and_validates_in_l2_and_eval_follows(tmp_path, monkeypatch, method):
    module = sys.modules[method]
    norms = []
    real = attacks.pgd
    monkeypatch.setattr(attacks, "pgd", lambda *a, **k: norms.append(k.get("norm")) or real(*a, **k))  # validation
    out = tmp_path / "run"
    module.main(["--dataset", "synthetic", "--arch", "cnn", "--epochs", "1", "--milestones", "--batch-size", "16",
                 "--max-batches", "2", "--val-size", "20", "--steps", "2", "--norm", "L2", "--out", str(out),
                 "--device", DEV])
    ck = torch.load(out / "best.pt", weights_only=True)
    assert ck["args"]["norm"] == "L2" and ck["args"]["eps"] == 128 / 255 and ck["args"]["alpha"] == 15 / 255
    assert norms == ["L2"] and ck["metrics"]["val_pgd"] is not None
    res = ev([str(out / "best.pt"), "--attacks", "clean", "pgd", "--n-examples", "10"])[str(out / "best.pt")]["ran"]
    assert res["pgd"]["attack"].startswith("PGD-20 (L2, eps 0.5, step 0.125") and res["pgd"]["norm"] == "L2"
    assert res["pgd"]["accuracy"] <= res["clean"]["accuracy"]


# ---------------------------------------------------------------- evaluation at scale: torchrun, any model,
# RobustBench

EVAL_DIE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import eval
real = eval.chunk_correct
calls = []
def chunk_correct(*a, **k):
    calls.append(1)
    if len(calls) == {n} and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
eval.chunk_correct = chunk_correct
eval.cli(lambda: eval.main(sys.argv[1:]))
"""


def stores(results_dir):
    s = torch.load(os.path.join(results_dir, "run", "best.eval.pt"), weights_only=True)
    return {k: e for k, e in s["attacks"].items()}


@pytest.mark.slow
def test_eval_under_torchrun_gives_each_image_the_one_process_result_and_resumes_with_any_count(tmp_path):
    at.main(["--dataset", "synthetic", "--arch", "cnn", "--epochs", "1", "--milestones", "--batch-size", "32",
             "--max-batches", "3", "--val-size", "20", "--out", str(tmp_path / "run"), "--device", "cpu"])
    flags = [str(tmp_path / "run" / "best.pt"), "--attacks", "clean", "pgd", "cw", "aa", "--n-examples", "40",
             "--batch-size", "10", "--checks", "--checks-n", "20", "--square-queries", "20", "--eps", "4/255",
             "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    one = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), *flags, "--results-dir", str(tmp_path / "r1")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*torchrun, os.path.join(HERE, "eval.py"), *flags, "--results-dir", str(tmp_path / "r2")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = stores(tmp_path / "r1"), stores(tmp_path / "r2")
    names = {e["name"] for e in a.values()}
    assert names == {"clean", "fgsm", "pgd", "cw", "aa", "square"} and set(a) == set(b) and len(a) == 19
    for k in a:  # PGD, CW, AutoAttack, the checks' attacks: every image as one process has it
        assert torch.equal(a[k]["correct"], b[k]["correct"]), k
    assert two.stdout.count("all checks pass") + two.stdout.count("checks warn") == 1  # one process prints
    assert "(2 processes)" in two.stderr and two.stderr.count("AutoAttack standard (Linf, eps 4/255): 40/40") == 1
    one_json, two_json = (json.load(open(tmp_path / r / "run" / "best.eval.json")) for r in ("r1", "r2"))
    assert {k: v["accuracy"] for k, v in one_json["results"].items()} == \
           {k: v["accuracy"] for k, v in two_json["results"].items()}
    # a 2-process evaluation killed in its third round (rank 1 dies), resumed with 1 process: the same per image
    (tmp_path / "die.py").write_text(EVAL_DIE.format(repo=HERE, n=5))
    killed = subprocess.run([*torchrun, str(tmp_path / "die.py"), *flags, "--results-dir", str(tmp_path / "r3")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0
    partial = stores(tmp_path / "r3")
    assert 0 < sum(int(e["done"].sum()) for e in partial.values()) < sum(len(e["done"]) for e in a.values())
    resumed = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), *flags, "--results-dir",
                              str(tmp_path / "r3")], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    c = stores(tmp_path / "r3")
    for k in a:
        assert torch.equal(a[k]["correct"], c[k]["correct"]), k


EXTERNAL = """
import torch, torch.nn as nn


class NearestMean(nn.Module):
    \"\"\"A network of another project, trained on normalised inputs: logits = -||z - T_k||^2, z normalised.\"\"\"
    def __init__(self):
        super().__init__()
        self.templates = nn.Parameter(torch.zeros(10, 3, 32, 32))

    def forward(self, z):
        return -((z[:, None] - self.templates[None]) ** 2).flatten(2).sum(2)


class NoisyNearestMean(NearestMean):
    def forward(self, z):
        return super().forward(z + 0.3 * torch.randn_like(z))


def net():
    return NearestMean()


def noisy():
    return NoisyNearestMean()
"""


def test_eval_of_a_normalised_external_model(tmp_path):
    # a foreign network (--model FILE.py:FUNCTION) whose weights expect inputs normalised per channel
    ds = data.load("synthetic", val_size=0)
    mean, std = (0.9, 0.2, 0.6), (0.1, 0.4, 0.2)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    x = ds["train_x"][:5000].float() / 255
    templates = torch.stack([(x[ds["train_y"][:5000] == k].mean(0) - m) / s for k in range(10)])
    (tmp_path / "theirs.py").write_text(EXTERNAL)
    torch.save({"state_dict": {"templates": templates}}, tmp_path / "theirs.pth")
    test_x, test_y = ds["test_x"][:60].float() / 255, ds["test_y"][:60]
    logits = lambda z: -((z[:, None] - templates[None]) ** 2).flatten(2).sum(2)  # noqa: E731 (the slow model)
    right = 100 * (logits((test_x - m) / s).argmax(1) == test_y).float().mean().item()
    wrong = 100 * (logits(test_x).argmax(1) == test_y).float().mean().item()
    assert right > 90 and wrong < right - 50
    ck = str(tmp_path / "theirs.pth")
    norm = ["--mean", *map(str, mean), "--std", *map(str, std)]
    base = [ck, "--model", f"{tmp_path / 'theirs.py'}:net", "--dataset", "synthetic", "--attacks", "clean",
            "--n-examples", "60", "--device", "cpu"]
    got = ev(base + norm + ["--results-dir", str(tmp_path / "right")])[ck]["ran"]["clean"]["accuracy"]
    assert got == pytest.approx(right)
    assert ev(base + ["--results-dir", str(tmp_path / "wrong")])[ck]["ran"]["clean"]["accuracy"] == pytest.approx(wrong)
    one_line_error(evaluate.main, ck, "--model", f"{tmp_path / 'theirs.py'}:net", "--dataset", "synthetic",
                   "--robustbench", "--n-examples", "100", match="--robustbench fixes --n-examples to 10000")
    one_line_error(evaluate.main, ck, "--model", f"{tmp_path / 'theirs.py'}:nothing", "--dataset", "synthetic",
                   "--attacks", "clean", match="defines no function nothing")
    one_line_error(evaluate.main, ck, "--mean", "0.5", "--attacks", "clean", match="--mean and --std go together")
    # a randomised model: AutoAttack's rand version (EOT), stored like the other attacks
    res = ev([ck, "--model", f"{tmp_path / 'theirs.py'}:noisy", "--dataset", "synthetic", "--normalize", "cifar10",
              "--attacks", "clean", "aa-rand", "--n-examples", "6", "--eps", "2/255", "--results-dir",
              str(tmp_path / "rand"), "--device", "cpu"])[ck]["ran"]
    assert res["aa-rand"]["attack"].startswith("AutoAttack rand (Linf, eps 2/255, APGD-CE and APGD-DLR with EOT")
    assert 0 <= res["aa-rand"]["accuracy"] <= 100


@pytest.mark.slow
def test_robustbench_protocol_and_claim(cifar, tmp_path, capsys):
    # RobustBench's protocol (standard AutoAttack, the first 10,000 test images: the 48 the small test set has) and
    # its model_info fields, what only the user knows marked TODO
    root, _ = cifar
    at.main(at_args(root, tmp_path / "run", "--epochs", "1", "--milestones", "--max-batches", "2"))
    ck = str(tmp_path / "run" / "best.pt")
    res = ev([ck, "--robustbench", "--checks-n", "20", "--batch-size", "48"])[ck]
    assert res["ran"]["aa"]["n_examples"] == 48 and res["ran"]["aa"]["attack"] == "AutoAttack standard (Linf, eps 8/255)"
    out = capsys.readouterr().out
    assert "first 48 images (all there are; --n-examples 10000 asked for more)" in out
    assert "deterministic (yes), non-zero gradients (yes)" in out and "fill in the fields marked TODO" in out
    claim = json.load(open(tmp_path / "run" / "best.robustbench.json"))
    assert list(claim) == ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                           "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"]
    assert claim["clean_acc"] == f"{res['ran']['clean']['accuracy']:.2f}" and claim["eps"] == "8/255"
    assert claim["autoattack_acc"] == f"{res['ran']['aa']['accuracy']:.2f}" and claim["dataset"] == "cifar10"
    assert claim["additional_data"] is False and claim["architecture"] == "small CNN"
    assert claim["link"].startswith("TODO") and claim["venue"].startswith("TODO") and claim["footnote"] is None
    saved = json.load(open(tmp_path / "run" / "best.eval.json"))["robustbench"]
    assert saved["requirements"] == [] and saved["protocol"].startswith("AutoAttack standard, Linf eps 8/255")
    one_line_error(evaluate.main, ck, "--robustbench", "--n-examples", "100",
                   match="--robustbench fixes --n-examples to 10000")
    one_line_error(evaluate.main, ck, "--robustbench", "--eps", "4/255", match="--robustbench evaluates at Linf 8/255")


# ---------------------------------------------------------------- IDBH, on the device

def test_idbh_operations_equal_torchvision_on_single_images():
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    torch.manual_seed(0)
    for channels in (3, 1):
        x = torch.randint(0, 256, (6, channels, 32, 32), dtype=torch.uint8)
        x[0] = x[0] // 4 + 100  # low contrast: autocontrast and equalize have work to do
        x[1, 0] = 7  # a constant channel: left as it is
        x[2] = torch.randint(0, 3, (channels, 32, 32), dtype=torch.uint8) * 100  # few grey levels
        f = torch.tensor([0.1, 0.37, 0.5, 1.0, 1.43, 1.9], dtype=torch.float64)
        for op, ref in (("saturation", TF.adjust_saturation), ("brightness", TF.adjust_brightness),
                        ("contrast", TF.adjust_contrast), ("sharpness", TF.adjust_sharpness)):
            got = data.adjust(x.to(DEV), op, f.to(DEV)).cpu()
            want = torch.stack([ref(x[i], float(f[i])) for i in range(len(x))])
            if DEV == "cpu":  # the same float32 operations in the same order: bitwise
                assert torch.equal(got, want), op
            assert (got.int() - want.int()).abs().max() <= 1, op  # on a GPU, rounding: at most 1 of 255, rarely
            assert (got != want).float().mean() < 1e-3, op
        assert torch.equal(data.autocontrast(x.to(DEV)).cpu(), torch.stack([TF.autocontrast(i) for i in x]))
        assert torch.equal(data.equalize(x.to(DEV)).cpu(), torch.stack([TF.equalize(i) for i in x]))
        deg = torch.tensor([-20.05, -8.6, -2.9, 3.0, 8.6, 20.05], dtype=torch.float64)
        zero = torch.zeros_like(deg)
        nearest = InterpolationMode.NEAREST
        for axis in (0, 1):
            got = data.affine_nearest(x.to(DEV), zero.to(DEV), (deg if axis == 0 else zero).to(DEV),
                                      (zero if axis == 0 else deg).to(DEV)).cpu()
            want = torch.stack([TF.affine(x[i], angle=0.0, translate=[0, 0], scale=1.0,
                                          shear=[float(deg[i]), 0.0] if axis == 0 else [0.0, float(deg[i])],
                                          interpolation=nearest, fill=0) for i in range(len(x))])
            assert torch.equal(got, want) if DEV == "cpu" else (got != want).float().mean() < 1e-3  # GPU: a tie
        rot = torch.tensor([-30.0, -10.0, -1.0, 1.0, 10.0, 30.0], dtype=torch.float64)
        got = data.affine_nearest(x.to(DEV), -rot.to(DEV), zero.to(DEV), zero.to(DEV)).cpu()
        want = torch.stack([TF.rotate(x[i], float(rot[i]), interpolation=nearest, fill=0) for i in range(len(x))])
        assert torch.equal(got, want) if DEV == "cpu" else (got != want).float().mean() < 1e-3
        # CropShift against the released sequence of crop, pad and crop; erasing against torchvision's erase
        cx, cy = torch.tensor([0, 3, 10, 5, 0, 2]), torch.tensor([0, 7, 0, 5, 9, 0])
        ox1, oy1 = torch.tensor([0, 2, 10, 1, 0, 1]), torch.tensor([0, 7, 0, 4, 3, 0])
        ox2, oy2 = torch.tensor([0, 0, 4, 5, 0, 2]), torch.tensor([0, 1, 0, 2, 9, 0])
        got = data.crop_shift(x.to(DEV), *(t.to(DEV) for t in (cx, cy, ox1, oy1, ox2, oy2))).cpu()
        for i in range(len(x)):
            w = TF.crop(x[i], int(oy1[i]), int(ox1[i]), 32 - int(cy[i]), 32 - int(cx[i]))
            w = TF.pad(w, padding=[int(cx[i]), int(cy[i])], fill=0)
            assert torch.equal(got[i], TF.crop(w, int(oy2[i]), int(ox2[i]), 32, 32)), i
        box = [torch.tensor(v) for v in ([0, 3, 10, 0, 20, 5], [0, 4, 0, 9, 1, 5], [0, 5, 22, 32, 3, 1],
                                         [0, 7, 11, 1, 30, 2])]
        got = data.erase(x.float().to(DEV), *(t.to(DEV) for t in box)).cpu()
        want = torch.stack([TF.erase(x[i].float(), int(box[0][i]), int(box[1][i]), int(box[2][i]), int(box[3][i]),
                                     torch.tensor(0.0)) for i in range(len(x))])
        assert torch.equal(got, want)


def test_idbh_draws_follow_the_tables():
    g = torch.Generator(device=DEV).manual_seed(0)
    n = 40000
    for variant in data.IDBH_VARIANTS:
        shifts, table, p_erase, max_area = data.IDBH_VARIANTS[variant]
        t = data.IDBH_TABLES[table]
        p = data.idbh_params(n, 32, 32, variant, g, DEV)
        p = {k: (tuple(v.cpu() for v in val) if isinstance(val, tuple) else val.cpu()) for k, val in p.items()}
        for k, want in enumerate(t["p"]):  # each op's frequency, within 4 standard deviations
            got = (p["op"] == k).double().mean().item()
            assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / n), (variant, data.IDBH_OPS[k], got)
        s = p["cx"] + p["cy"]
        assert s.min() == 0 and s.max() == shifts - 1 and abs(s.double().mean() - (shifts - 1) / 2) < 0.1
        assert (p["ox1"] <= p["cx"]).all() and (p["oy2"] <= p["cy"]).all() and (p["cx"] >= 0).all()
        assert abs(p["flip"].double().mean() - 0.5) < 0.02
        rot = p["rotate"]
        assert set(rot.abs().long().tolist()) == set(range(*t["rotate"])) and abs((rot < 0).double().mean() - .5) < .02
        shear = torch.deg2rad(p["shear"].abs())
        assert shear.min() >= t["shear"][0] and shear.max() <= t["shear"][1]
        i, j, h, w = p["erase"]
        erased = h > 0
        assert abs(erased.double().mean() - p_erase) < 0.02, variant  # the tries almost always fit at 32 px
        frac = (h * w)[erased].double() / 1024
        assert frac.min() > 0.015 and frac.max() < max_area + 0.05 and ((i + h) <= 32).all() and ((j + w) <= 32).all()


def test_idbh_training_resumes_bitwise(tmp_path):
    base = ["--dataset", "synthetic", "--arch", "cnn", "--milestones", "--batch-size", "16", "--max-batches", "2",
            "--val-size", "20", "--steps", "2", "--augment", "idbh-cifar10-strong", "--device", DEV]
    at.main(base + ["--epochs", "2", "--out", str(tmp_path / "straight")])
    at.main(base + ["--epochs", "1", "--out", str(tmp_path / "resumed")])
    at.main(base + ["--epochs", "2", "--out", str(tmp_path / "resumed"), "--resume"])
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for k in a["model"]:
        assert same(a["model"][k], b["model"][k]), k
    # the batches are IDBH's: erased rectangles and black borders appear, the images differ from crop-flip's
    ds = data.load("synthetic", val_size=0, augment="idbh-cifar10-strong")
    (x, _, _), = data.batches(ds["train_x"][:64], ds["train_y"][:64], 64, shuffle=True, augment=ds["augment"],
                              seed=1)
    assert ((x == 0).flatten(1).float().mean(1) > 0.02).float().mean() > 0.9  # erasing p 1: a black patch each


# ---------------------------------------------------------------- extra and generated data

def write_extra(path, n, size=32, classes=10, seed=0, compressed=False, kind="npz"):
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, classes, n)
    if kind == "npz":
        (np.savez_compressed if compressed else np.savez)(path, image=images, label=labels)
    else:  # Carmon et al.'s pickle: a dict of arrays
        with open(path, "wb") as f:
            pickle.dump({"data": images, "extrapolated_targets": labels}, f)
    return images, labels


def test_extra_data_files_and_how_batches_mix_them(tmp_path):
    shape, cache = (3, 32, 32), str(tmp_path / "cache")
    for kind, compressed in (("npz", False), ("npz", True), ("pickle", False)):
        path = str(tmp_path / f"extra-{kind}-{compressed}.{kind}")
        images, labels = write_extra(path, 50, compressed=compressed, kind=kind)
        x, y = data.load_extra(path, shape, 10, cache)
        assert np.array_equal(np.asarray(x), images) and torch.equal(y, torch.from_numpy(labels))
        if kind == "npz":
            assert isinstance(x, np.memmap)  # in place (stored) or from the .npy cache (compressed): never in memory
        if kind == "npz":  # a cache only for the compressed file
            assert os.path.isdir(tmp_path / "cache") == compressed
    # bad files: one line each
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2))
    np.savez(tmp_path / "shape.npz", image=np.zeros((2, 28, 28, 1), np.uint8), label=np.zeros(2, np.int64))
    np.savez(tmp_path / "classes.npz", image=np.zeros((2, 32, 32, 3), np.uint8), label=np.array([3, 10]))
    (tmp_path / "text.npz").write_text("not a zip")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(tmp_path / "evil.pickle", "wb") as f:
        pickle.dump({"data": Evil(), "extrapolated_targets": [1]}, f)
    for name, match in (("keys.npz", "holds images, labels; the generated-image files hold image and label"),
                        ("shape.npz", r"images of shape \(2, 28, 28, 1\).*needs N x 32 x 32 x 3 uint8"),
                        ("classes.npz", r"labels 3 .. 10 fall outside the data set's 10 classes"),
                        ("text.npz", "is not an .npz file"), ("nothing.npz", "does not exist"),
                        ("evil.pickle", r"refusing to load .*evil.pickle: the pickle holds posix.system")):
        one_line_error(lambda a: data.load_extra(a[0], shape, 10, cache), str(tmp_path / name), match=match)
    assert not marker.exists()
    one_line_error(at.main, "--extra-fraction", "0.7",
                   match="--extra-fraction: give the extra images with --extra-data")
    # batches: B labelled + E extra images a batch, the extra ones in the order of the epoch's permutation of the set,
    # the joined batch shuffled
    images, labels = write_extra(tmp_path / "mix.npz", 30)
    ds = data.load("synthetic", val_size=0)
    extra_rows = torch.from_numpy(images).permute(0, 3, 1, 2)
    for where in ("device", "host"):
        extra = data.attach_extra(str(tmp_path / "mix.npz"), ds, torch.device(DEV), where, cache)
        got = list(data.batches(ds["train_x"][:40], ds["train_y"][:40], 8, shuffle=True, seed=5, max_batches=5,
                                extra=extra, extra_per_batch=12))
        assert [len(b[1]) for b in got] == [20] * 5
        order = torch.randperm(30, generator=torch.Generator().manual_seed(5 + 2**40))
        want = order[torch.arange(60) % 30]  # 5 batches of 12 from a set of 30: the permutation, then again
        for i, (x, y, _) in enumerate(got):
            xs = (x * 255).round().byte().cpu()
            k = want[12 * i:12 * (i + 1)]
            at_ = [next(j for j in range(20) if torch.equal(xs[j], extra_rows[e])) for e in k.tolist()]
            assert len(set(at_)) == 12 and torch.equal(y[at_].cpu(), torch.from_numpy(labels[k.numpy()]))
            assert at_ != list(range(8, 20))  # mixed into the batch, not appended after the labelled images
            rest = [j for j in range(20) if j not in at_]
            assert set(y[rest].tolist()) <= set(ds["train_y"][:40].tolist())
    # under torchrun each process holds the batch's mix: 2 processes split the shuffled global batch, together they
    # hold the one-process batch, and neither holds only labelled or only extra images (before the mix, process 0
    # held the 8 labelled images and 2 extra ones, process 1 only extra ones)
    extra = data.attach_extra(str(tmp_path / "mix.npz"), ds, torch.device(DEV), "device", cache)
    kw = dict(shuffle=True, seed=5, max_batches=5, extra=extra, extra_per_batch=12, noise=data.uniform)
    one = list(data.batches(ds["train_x"][:40], ds["train_y"][:40], 8, **kw))
    two = [list(data.batches(ds["train_x"][:40], ds["train_y"][:40], 8, rank=r, world=2, **kw)) for r in (0, 1)]
    is_extra = lambda x: [any(torch.equal(xi, e) for e in extra_rows) for xi in (x * 255).round().byte().cpu()]  # noqa
    shares = []
    for b in range(5):
        for i in range(3):
            assert torch.equal(torch.cat([two[0][b][i], two[1][b][i]]), one[b][i])
        shares.append([sum(is_extra(two[r][b][0])) for r in (0, 1)])
    assert all(0 < n < 10 for pair in shares for n in pair) and all(sum(pair) == 12 for pair in shares), shares
    print(f"extra images per process (of 10), 5 batches of 8 labelled + 12 extra on 2 processes: {shares}")


@pytest.mark.slow
def test_extra_data_in_the_methods_batch_terms_resume_and_residency(tmp_path, monkeypatch):
    write_extra(tmp_path / "ti.pickle", 64, kind="pickle")
    base = ["--dataset", "synthetic", "--arch", "cnn", "--milestones", "--batch-size", "16", "--max-batches", "2",
            "--val-size", "20", "--steps", "1", "--extra-data", str(tmp_path / "ti.pickle"), "--data-dir",
            str(tmp_path / "cache"), "--device", DEV]
    # ISEAT's --rst: every batch of 16 joined by 16 extra images; the ranks run over all 32
    sizes = []
    real = iseat.rank_weights
    monkeypatch.setattr(iseat, "rank_weights", lambda av: sizes.append(len(av)) or real(av))
    iseat.main(base + ["--epochs", "1", "--lam", "0.1", "--out", str(tmp_path / "iseat")])
    assert sizes == [32, 32]
    # SAR's DFT over the mixed batch: a fraction 0.25 of every batch of 16 is extra
    rows = []
    real_loss = sar.sar_loss
    monkeypatch.setattr(sar, "sar_loss", lambda a, b, fft: rows.append(len(a)) or real_loss(a, b, fft))
    sar.main(base + ["--epochs", "1", "--extra-fraction", "0.25", "--out", str(tmp_path / "sar")])
    assert rows == [16, 16]
    log = json.loads(open(tmp_path / "sar" / "log.jsonl").readline())
    assert log["img_per_s"] > 0
    # resume is bitwise, and the set on the host (memory-mapped) gives the weights of the set on the device
    at.main(base + ["--epochs", "2", "--out", str(tmp_path / "straight"), "--extra-on", "device"])
    at.main(base + ["--epochs", "1", "--out", str(tmp_path / "resumed"), "--extra-on", "host"])
    at.main(base + ["--epochs", "2", "--out", str(tmp_path / "resumed"), "--extra-on", "host", "--resume"])
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for k in a["model"]:
        assert same(a["model"][k], b["model"][k]), k


def test_plain_array_pickles_of_every_protocol_load_and_code_never_runs(tmp_path):
    # numpy rebuilds a plain array through other functions in each pickle protocol (protocols 0-2: _codecs.encode;
    # 5: numpy._core.numeric._frombuffer); every protocol loads, and a pickle that names anything else is refused
    # before its code runs
    images = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    for protocol in range(6):
        path = tmp_path / f"p{protocol}.pickle"
        with open(path, "wb") as f:
            pickle.dump({"data": images, "extrapolated_targets": np.array([1, 2])}, f, protocol=protocol)
        x, y = data.load_extra(str(path), (3, 32, 32), 10)
        assert np.array_equal(x, images) and y.tolist() == [1, 2], protocol
    marker = tmp_path / "pwned"

    class Evil:
        def __init__(self, fn, *args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return (self.fn, self.args)
    for i, evil in enumerate((Evil(os.system, f"touch {marker}"), Evil(eval, f"open({str(marker)!r}, 'w')"),
                              Evil(subprocess.call, ["touch", str(marker)]), Evil(np.save, str(marker), images))):
        for protocol in (0, 2, 5):
            path = tmp_path / f"evil{i}-{protocol}.pickle"
            with open(path, "wb") as f:
                pickle.dump({"data": evil, "extrapolated_targets": [1]}, f, protocol=protocol)
            one_line_error(lambda a: data.load_extra(a[0], (3, 32, 32), 10), str(path), match="refusing to load")
    assert not marker.exists() and not os.path.exists(str(marker) + ".npy")


def test_robustbench_claim_states_the_extra_data_and_its_board(cifar, tmp_path):
    # trained with Carmon et al.'s pickle (real images): additional_data true; with a generated .npz: false and a
    # footnote with the number of images, as RobustBench's entries; any other board is refused in one line
    root, _ = cifar
    claims = {}
    for kind in ("pickle", "npz"):
        write_extra(tmp_path / f"extra.{kind}", 1500, kind=kind)
        run = tmp_path / kind
        at.main(at_args(root, run, "--epochs", "1", "--milestones", "--max-batches", "1", "--steps", "1",
                        "--extra-data", str(tmp_path / f"extra.{kind}")))
        args = evaluate.get_args([str(run / "best.pt"), "--robustbench"])
        model, info = evaluate.load_model(str(run / "best.pt"), args, torch.device("cpu"))
        args = evaluate.for_checkpoint(args, info)
        record = {"results": {"c": dict(name="clean", n_examples=48, accuracy=50.0),
                              "a": dict(name="aa", n_examples=48, accuracy=20.0, eps=8 / 255, norm="Linf")}}
        claims[kind] = evaluate.robustbench_claim(record, info, args, 48, [])
    assert claims["pickle"]["additional_data"] is True and claims["pickle"]["footnote"] is None
    assert claims["npz"]["additional_data"] is False
    assert claims["npz"]["footnote"] == "It uses additional 1.5K synthetic images in training."
    # a model this project did not train: the user says, else TODO
    args = evaluate.get_args([str(tmp_path / "npz" / "best.pt"), "--robustbench", "--additional-data", "synthetic:20M"])
    claim = evaluate.robustbench_claim(record, dict(info, additional=None), evaluate.for_checkpoint(args, info), 48, [])
    assert claim["footnote"] == "It uses additional 20M synthetic images in training."
    claim = evaluate.robustbench_claim(record, dict(info, additional=None), evaluate.for_checkpoint(
        evaluate.get_args([str(tmp_path / "npz" / "best.pt"), "--robustbench"]), info), 48, [])
    assert claim["additional_data"].startswith("TODO")
    one_line_error(ev, str(tmp_path / "npz" / "best.pt"), "--additional-data", "generated",
                   match="give none, real or synthetic:N")
    # boards: CIFAR-10 Linf and L2, CIFAR-100 Linf (and ImageNet); not the synthetic set
    at.main(["--dataset", "synthetic", "--arch", "cnn", "--epochs", "1", "--milestones", "--batch-size", "16",
             "--max-batches", "1", "--val-size", "20", "--steps", "1", "--out", str(tmp_path / "syn"), "--device", DEV])
    one_line_error(ev, str(tmp_path / "syn" / "best.pt"), "--robustbench",
                   match=r"is synthetic Linf, and RobustBench's boards are CIFAR-10 Linf and L2, CIFAR-100 Linf")


# ---------------------------------------------------------------- vulnerability.py: ISEAT's per-image analysis

def test_vulnerability_statistics_equal_hand_values():
    import vulnerability
    # Gini of [0, 0, 0, 4]: sum_ij |a_i - a_j| = 2 * 3 * 4 = 24, over 2 n^2 mean = 2 * 16 * 1 = 32: 0.75
    assert vulnerability.gini(torch.tensor([0.0, 0.0, 0.0, 4.0])) == pytest.approx(0.75)
    assert vulnerability.gini(torch.full((7,), 2.0)) == pytest.approx(0.0)
    a = torch.rand(37, dtype=torch.float64) * 3
    slow = sum(abs(float(u) - float(w)) for u in a for w in a) / (2 * 37 ** 2 * float(a.mean()))
    assert vulnerability.gini(a) == pytest.approx(slow, rel=1e-9)
    # a crafted set of 20 images: clean CE 0.5 each, adversarial CE 0.5 + v_i with v_i = 0.1 i (i = 0 .. 19)
    v = torch.arange(20) * 0.1
    clean, adv = torch.full((20,), 0.5), 0.5 + v
    robust, correct = (torch.arange(20) < 5).float(), torch.ones(20)
    prev = torch.stack([clean, adv + torch.where(torch.arange(20) < 15, 0.2, -0.1), robust, correct])
    st = vulnerability.statistics(torch.stack([clean, adv, robust, correct]), prev)
    assert st["mean"] == pytest.approx(0.95) and st["std"] == pytest.approx(float(v.std()))
    assert st["top10"] == pytest.approx((1.9 + 1.8) / 2) and st["bottom10"] == pytest.approx((0.0 + 0.1) / 2)
    assert st["rose"] == pytest.approx(5 / 20) and st["mean_fell"] is True  # mean fell by 0.2 * 15/20 - 0.1 * 5/20
    assert st["robust_acc"] == pytest.approx(25.0) and st["clean_acc"] == pytest.approx(100.0)
    assert st["gini"] == pytest.approx(vulnerability.gini(adv))


def test_vulnerability_per_image_numbers_equal_a_loop_over_images():
    import vulnerability
    torch.manual_seed(0)
    model = models.get_model("cnn", 10).eval()
    x = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (7,))
    noise = torch.rand(7, 3, 16, 16)
    got = vulnerability.per_image(model, x, y, 8 / 255, 2 / 255, 3, "Linf", noise, batch_size=3)
    for i in range(7):  # one image at a time: PGD-3 from its own start, CE before and after
        xi = x[i:i + 1].float() / 255
        delta = (noise[i:i + 1] * 2 - 1) * 8 / 255
        xa = (xi + delta).clamp(0, 1)
        for _ in range(3):
            xa.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y[i:i + 1]), xa)
            xa = torch.min(torch.max(xa.detach() + 2 / 255 * g.sign(), xi - 8 / 255), xi + 8 / 255).clamp(0, 1)
        with torch.no_grad():
            want = [F.cross_entropy(model(xi), y[i:i + 1]).item(), F.cross_entropy(model(xa), y[i:i + 1]).item(),
                    float(model(xa).argmax(1).item() == y[i]), float(model(xi).argmax(1).item() == y[i])]
        assert got[:, i].tolist() == pytest.approx(want, abs=1e-5), i


@pytest.mark.slow
def test_snapshots_and_the_vulnerability_analysis_resume_and_recompute_nothing(tmp_path, monkeypatch, capsys):
    import vulnerability
    base = ["--dataset", "synthetic", "--arch", "cnn", "--batch-size", "16", "--max-batches", "2", "--val-size", "30",
            "--steps", "2", "--milestones", "2", "--device", DEV]
    run = tmp_path / "at"
    at.main(base + ["--epochs", "3", "--save-every", "2", "--out", str(run)])
    at.main(base + ["--epochs", "5", "--save-every", "2", "--out", str(run), "--resume"])  # snapshots survive it
    assert sorted(p.name for p in run.glob("epoch_*.pt")) == ["epoch_2.pt", "epoch_4.pt"]
    ck = torch.load(run / "epoch_4.pt", weights_only=True)
    assert ck["epoch"] == 4 and ck["format"] == models.CKPT_FORMAT and "optimizer" not in ck
    nosnap = tmp_path / "plain"
    at.main(base + ["--epochs", "1", "--milestones", "--out", str(nosnap)])
    one_line_error(vulnerability.main, str(nosnap), match=r"holds no snapshots \(epoch_N.pt\); train it with "
                                                          r"--save-every K")
    # killed after the first snapshot: the second call continues, equal to an uninterrupted one, and a third
    # computes nothing
    args = [str(run), "--n-images", "20", "--batch-size", "8", "--device", DEV]
    ref_run = tmp_path / "ref"
    import shutil
    shutil.copytree(run, ref_run, copy_function=shutil.copy2)  # the same files and mtimes
    ref = vulnerability.main([str(ref_run)] + args[1:])[str(ref_run)]
    real, calls = vulnerability.per_image, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the second snapshot's training images
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(vulnerability, "per_image", dying)
    with pytest.raises(KeyboardInterrupt):
        vulnerability.main(args)
    monkeypatch.setattr(vulnerability, "per_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    calls.clear()
    got = vulnerability.main(args)[str(run)]
    assert len(calls) == 2  # only the second snapshot: its training and held-out images
    assert got["snapshots"] == ref["snapshots"]
    calls.clear()
    again = vulnerability.main(args)[str(run)]
    assert calls == [] and again["snapshots"] == got["snapshots"]
    # a smaller --n reads the first images of the larger analysis and removes nothing
    small = vulnerability.main([str(run), "--n-images", "10", "--batch-size", "8", "--device", DEV])[str(run)]
    assert calls == [] and small["n_images"] == 10
    saved = json.load(open(run / "vulnerability.json"))
    latest = saved["analyses"][saved["latest"]]["snapshots"]
    assert len(saved["analyses"]) == 2 and all("gini" in s for s in latest.values())
    out = capsys.readouterr().out
    assert "picture: " in out and os.path.getsize(run / "vulnerability.png") > 10000
    both = vulnerability.main([str(run), str(ref_run), "--n-images", "20", "--batch-size", "8", "--device", DEV])
    beside = json.load(open(tmp_path / "report" / "vulnerability.json"))  # several runs: the numbers beside the picture
    assert set(beside) == set(both) and os.path.getsize(tmp_path / "report" / "vulnerability.png") > 10000
    assert all("gini" in s for s in beside[str(run)]["snapshots"].values()) and calls == []
    # under torchrun the images are spread over the processes in chunks: 2 processes give every per-image number of 1
    two = tmp_path / "two"
    shutil.copytree(ref_run, two, copy_function=shutil.copy2)
    os.remove(two / "vulnerability.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "vulnerability.py"), str(two), "--n-images", "20", "--batch-size", "4",
                        "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    one, both = (torch.load(d / "vulnerability.pt", weights_only=True) for d in (ref_run, two))
    assert len(one) == len(both) == 2
    for k1, k2 in zip(sorted(one), sorted(both)):
        for part in ("train", "held_out"):
            assert torch.allclose(one[k1][part], both[k2][part], atol=1e-6), (k1, part)


def test_trades_label_smoothing_matches_the_smoothed_target():
    torch.manual_seed(0)
    za, zc, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    for s in (0.0, 0.1):
        target = (1 - s) * F.one_hot(y, 10).float() + s / 10  # (1 - s) one-hot + s / C
        ce = -(target * F.log_softmax(zc, 1)).sum(1).mean()
        kl = (F.softmax(zc, 1) * (F.log_softmax(zc, 1) - F.log_softmax(za, 1))).sum(1).mean()
        assert torch.allclose(trades.trades_loss(za, zc, y, 5.0, s), ce + 5.0 * kl, atol=1e-6), s
