"""The test suite: runs on a CPU in a few minutes, with no network.

Data sets are written small and synthetic in their real on-disk formats (CIFAR python pickles, SVHN .mat files,
the Tiny ImageNet folder layout) and read by the real loading code; torchvision's checksums are patched to
the synthetic files' own. Every formula of METHODS.md is compared with a slow, obvious computation.
"""
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

import at
import attacks
import data
import eval as evaluate
import models
import utils
import wa

torch.set_num_threads(2)


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
    model = linear_model(W, b)
    x = torch.rand(16, 3, 4, 4)
    x[:4] = 0.0  # on the box's faces: clipping must bind
    x[4:8] = 1.0
    y = torch.randint(0, 2, (16,))
    eps = 8 / 255
    direction = torch.sign(W[1 - y] - W[y]).view_as(x)
    expected = (x + eps * direction).clamp(0, 1)
    for random_start in (False, True):
        x_adv = attacks.pgd(model, x, y, eps=eps, alpha=2 / 255, steps=10, random_start=random_start)
        assert torch.allclose(x_adv, expected, atol=1e-6)
    # FGSM: one step of size eps from x is already optimal for a linear model
    assert torch.allclose(attacks.fgsm(model, x, y, eps), expected, atol=1e-6)
    # the CW margin has the same optimum here
    assert torch.allclose(attacks.pgd(model, x, y, eps, 2 / 255, 10, loss="cw"), expected, atol=1e-6)


def test_pgd_stays_in_ball_and_box_and_leaves_model_alone():
    torch.manual_seed(0)
    model = models.get_model("cnn", 10)
    model.train()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
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
    exact = linear_worst_case(W, b, x, y, eps)
    assert 5 < exact.sum() < 35  # the test is only meaningful with robust and non-robust images
    model = linear_model(W, b)
    model.train()
    rng_before = torch.get_rng_state()
    got = attacks.autoattack(model, x, y, eps=eps, batch_size=16, seed=0)
    assert torch.equal(got, exact)
    assert torch.equal(attacks.autoattack(model, x, y, eps=eps, batch_size=16, n_examples=10), exact[:10])
    assert torch.equal(torch.get_rng_state(), rng_before)  # the library's reseeding does not leak out
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    # PGD can never beat the exact worst case (untargeted CE may miss the weakest of 9 pairs: hence AutoAttack)
    pgd_ok = attacks.correct(model, x, y, 16, attack=attacks.pgd, eps=eps, alpha=2 / 255, steps=20)
    assert pgd_ok[exact].all() and pgd_ok.sum() < 40


def test_frozen_evaluation_uses_eval_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.rand(4, 3, 5, 5))
    model.train()
    before = copy.deepcopy(model[1].state_dict())
    attacks.correct(model, torch.rand(8, 3, 5, 5), torch.zeros(8, dtype=torch.long), 4, attack=attacks.pgd, steps=2)
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
            wa.after_step(avg, model, "ema")
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
        ready = wa.after_epoch(avg, model, "swa", epoch, start_epoch=2, bn_batches=lambda: [(xs, None)])
        assert ready == (epoch >= 2)
    sd = avg.module.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.allclose(sd[k], sum(w[k] for w in ws[2:]) / 3, atol=1e-6)
    # BatchNorm statistics: recomputed from the data through the averaged Linear layer (one batch: exact moments)
    h = xs @ sd["0.weight"].T + sd["0.bias"]
    assert torch.allclose(sd["1.running_mean"], h.mean(0), atol=1e-5)
    assert torch.allclose(sd["1.running_var"], h.var(0, unbiased=True), atol=1e-4)


# ---------------------------------------------------------------- data

def test_crop_flip_moves_pixels_as_specified():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    pad = 2
    oy, ox = torch.randint(0, 2 * pad + 1, (6,)), torch.randint(0, 2 * pad + 1, (6,))
    flip = torch.tensor([True, False, True, False, True, True])
    got = data.crop_flip(x, pad, oy, ox, flip)
    for i in range(6):
        padded = np.zeros((3, 5 + 2 * pad, 7 + 2 * pad), dtype=np.uint8)
        padded[:, pad:pad + 5, pad:pad + 7] = x[i].numpy()
        want = padded[:, oy[i]:oy[i] + 5, ox[i]:ox[i] + 7]
        if flip[i]:
            want = want[:, :, ::-1]
        assert np.array_equal(got[i].numpy(), want), i
    # random_crop_flip: every output is one of the (2 pad + 1)^2 * 2 allowed crops of its input, and offsets vary
    out = data.random_crop_flip(x.repeat(20, 1, 1, 1), pad)
    seen = set()
    for i in range(len(out)):
        src = x[i % 6]
        match = [(a, c, f) for a in range(5) for c in range(5) for f in (False, True)
                 if torch.equal(out[i], data.crop_flip(src[None], pad, torch.tensor([a]), torch.tensor([c]),
                                                       torch.tensor([f]))[0])]
        assert match, i
        seen.update(match)
    assert len(seen) > 10


def test_batches_cover_the_data_once_and_shard_across_ranks():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    y = torch.arange(10)
    torch.manual_seed(0)
    got = torch.cat([yb for _, yb in data.batches(x, y, 4, shuffle=True)])
    assert sorted(got.tolist()) == list(range(10))
    xb, yb = next(data.batches(x, y, 4))
    assert xb.dtype == torch.float32 and torch.allclose(xb[:, 0, 0, 0] * 255, yb.float())
    parts = []
    for rank in range(2):
        torch.manual_seed(0)
        parts.append([yb.tolist() for _, yb in data.batches(x, y, 4, shuffle=True, rank=rank, world=2)])
    for a, b, whole in zip(*parts, [yb.tolist() for _, yb in data.batches(x, y, 4, shuffle=False)]):
        assert len(a) + len(b) == len(whole)
    merged = sorted(sum(parts[0], []) + sum(parts[1], []))
    assert merged == list(range(10))
    assert len(list(data.batches(x, y, 4, max_batches=2))) == 2


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles_are_read(tmp_path, monkeypatch, classes):
    root = str(tmp_path)
    tx, ty, sx, sy = write_cifar(root, monkeypatch, classes=classes)
    ds = data.load(f"cifar{classes}", root, val_size=30)
    assert ds["num_classes"] == classes and ds["pad"] == 4 and ds["flip"]
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
    assert not ds["flip"]  # digits are not mirror-symmetric


def test_tiny_imagenet_layout_is_read_and_cached(tmp_path):
    from PIL import Image
    base, wnids, val_labels = write_tiny_imagenet(str(tmp_path))
    ds = data.load("tiny_imagenet", str(tmp_path), val_size=2)
    assert ds["num_classes"] == 200 and ds["pad"] == 8
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
             "--batch-size", "4", "--val-size", "2", "--steps", "2", "--out", str(out)])
    res = evaluate.main([str(out / "last.pt"), "--attacks", "clean", "pgd", "--pgd-steps", "2"])
    assert res[str(out / "last.pt")]["n_examples"] == 6


# ---------------------------------------------------------------- models

def test_models_shapes_names_and_sizes():
    counts = {"preact_resnet18": 11_172_170, "resnet18": 11_173_962, "wrn34_10": 46_160_474}
    for arch in models.ARCHS:
        m = models.get_model(arch, 10).eval()
        if arch in counts:
            assert sum(p.numel() for p in m.parameters()) == counts[arch], arch
        with torch.no_grad():
            for size in (32, 64):
                if arch.startswith("wrn") and size == 64:
                    continue  # slow on a CPU; global pooling makes it size-agnostic like the others
                assert m(torch.rand(2, 3, size, size)).shape == (2, 10)
    keys = models.get_model("resnet18", 10).state_dict().keys()
    for k in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
              "layer2.0.shortcut.1.running_mean", "layer4.1.bn2.bias", "linear.weight"):
        assert k in keys
    keys = models.get_model("wrn34_10", 10).state_dict().keys()
    assert {"conv1.weight", "block1.layer.4.conv2.weight", "block2.layer.0.convShortcut.weight", "bn1.weight",
            "fc.bias"} <= set(keys) and not any(k.startswith("block1.layer.5") for k in keys)
    assert "bn.weight" in models.get_model("preact_resnet18", 100).state_dict()
    with pytest.raises(SystemExit, match="unknown arch 'resnet50'"):
        models.get_model("resnet50", 10)


# ---------------------------------------------------------------- training, checkpoints, resume, evaluation

def at_args(root, out, *extra):
    return ["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "3", "--milestones", "2",
            "--batch-size", "32", "--val-size", "40", "--out", str(out), *extra]


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
        assert ck["format"] == utils.CKPT_FORMAT and ck["arch"] == "cnn" and ck["args"]["epochs"] == 3
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metrics"]["val_pgd"] == max(r["val_pgd"] for r in log)
    res = evaluate.main([str(out / "last.pt"), "--attacks", "clean", "pgd", "cw", "aa", "--n-examples", "12",
                         "--batch-size", "12"])
    r = res[str(out / "last.pt")]["results"]
    assert r["aa"]["accuracy"] <= r["clean"]["accuracy"] and r["worst"]["accuracy"] <= r["pgd"]["accuracy"]
    assert "PGD-20 (Linf, eps 8/255, step 2/255" in r["pgd"]["attack"] and "CW-30" in r["cw"]["attack"]
    saved = json.load(open(out / "last.eval.json"))
    assert saved["results"]["pgd"]["accuracy"] == r["pgd"]["accuracy"] and saved["n_examples"] == 12
    # the WA weights: from last.pt with --weights wa, and wa_best.pt holds them as its model
    evaluate.main([str(out / "last.pt"), "--weights", "wa", "--attacks", "clean", "--n-examples", "8"])
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
    res = evaluate.main([str(tmp_path / "other.pth"), "--arch", "cnn", "--dataset", "cifar10", "--data-dir", root,
                         "--attacks", "clean", "--n-examples", "8"])
    model.eval()
    with torch.no_grad():
        ds = data.load("cifar10", root, val_size=0)
        want = (model(ds["test_x"][:8].float() / 255).argmax(1) == ds["test_y"][:8]).float().mean().item() * 100
    assert res[str(tmp_path / "other.pth")]["results"]["clean"]["accuracy"] == pytest.approx(want)


def final_state(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def assert_same_run(a, b):
    for key in ("model", "wa_model"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["wa_n"] == b["wa_n"] and a["best"] == b["best"]


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


def test_resume_after_kill_equals_uninterrupted_run(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    ref = tmp_path / "ref"
    at.main(at_args(root, ref, "--wa"))
    ref_log = [json.loads(line) for line in open(ref / "log.jsonl")]

    def dying_pgd(real):
        # killed in the middle of the third epoch: the 19th PGD call is the 5th batch of epoch 3, after two epochs
        # of 5 training batches and 2 validation calls (raw and averaged model) each
        calls = []

        def pgd(*a, **k):
            calls.append(1)
            if len(calls) == 19:
                raise KeyboardInterrupt
            return real(*a, **k)
        return pgd

    kill_and_resume(root, tmp_path / "killed", monkeypatch, attacks, "pgd", dying_pgd)
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
    at.main(at_args(root, tmp_path / "amp", "--amp", "--epochs", "1", "--max-batches", "2"))
    assert final_state(tmp_path / "amp")["epoch"] == 1


# ---------------------------------------------------------------- bad input: one clear line each

def test_bad_inputs_give_one_line_errors(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    with pytest.raises(SystemExit, match="unknown dataset 'cifar11'"):
        at.main(at_args(root, tmp_path / "x", "--dataset", "cifar11"))
    with pytest.raises(SystemExit, match="unknown arch"):
        at.main(at_args(root, tmp_path / "x", "--arch", "vgg"))
    # missing data, download impossible (simulated offline)
    import torchvision.datasets.cifar as tvc

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(tvc, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit, match=r"cifar100 not found in .*empty/ .*cifar-100-python.tar.gz"):
        data.load("cifar100", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="tiny_imagenet not found"):
        data.load("tiny_imagenet", str(tmp_path / "empty"), download=False)
    with pytest.raises(SystemExit, match="--val-size"):
        data.load("cifar10", root, val_size=10**6)
    with pytest.raises(SystemExit):  # argparse: invalid fraction value
        at.get_args(["--eps", "eight"])

    run = tmp_path / "run"
    at.main(at_args(root, run, "--epochs", "1", "--max-batches", "1"))
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):
        at.main(at_args(root, run, "--epochs", "1"))
    with pytest.raises(SystemExit, match="is a at run of cnn"):
        at.main(at_args(root, run, "--resume", "--arch", "resnet18"))
    # a checkpoint of another architecture
    torch.save(models.get_model("resnet18", 10).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(SystemExit, match=r"does not fit arch 'cnn': \d+ missing keys .* pass the --arch"):
        evaluate.main([str(tmp_path / "r18.pt"), "--arch", "cnn", "--dataset", "cifar10", "--data-dir", root])
    with pytest.raises(SystemExit, match="pass --arch and --dataset"):
        evaluate.main([str(tmp_path / "r18.pt")])
    with pytest.raises(SystemExit, match="trained with --arch cnn, not resnet18"):
        evaluate.main([str(run / "last.pt"), "--arch", "resnet18"])
    with pytest.raises(SystemExit, match="holds no weight average"):
        evaluate.main([str(run / "last.pt"), "--weights", "wa"])
    # a truncated file
    blob = open(run / "last.pt", "rb").read()
    open(tmp_path / "trunc.pt", "wb").write(blob[: len(blob) // 2])
    with pytest.raises(SystemExit, match="truncated or not a torch checkpoint"):
        evaluate.main([str(tmp_path / "trunc.pt")])
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main([str(tmp_path / "nothing.pt")])
    # a pickle that is not plain tensors and values is refused, and its code never runs
    torch.save({"model": models.get_model("cnn", 10)}, tmp_path / "pickled_module.pt")
    with pytest.raises(SystemExit, match="refusing to load .* weights_only=True"):
        evaluate.main([str(tmp_path / "pickled_module.pt"), "--arch", "cnn", "--dataset", "cifar10"])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match="refusing to load"):
        evaluate.main([str(tmp_path / "evil.pt"), "--arch", "cnn", "--dataset", "cifar10"])
    assert not marker.exists()


# ---------------------------------------------------------------- SAR

import sar  # noqa: E402
import spectral  # noqa: E402


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
        modes.append(model.training)
        return real_pgd(model, *a, **k)
    monkeypatch.setattr(attacks, "pgd", recording_pgd)
    calls = []
    real_loss = sar.sar_loss
    monkeypatch.setattr(sar, "sar_loss", lambda *a: calls.append(a[0].shape) or real_loss(*a))
    out = tmp_path / "sar"
    sar.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2", "--milestones", "1",
              "--batch-size", "32", "--val-size", "40", "--max-batches", "3", "--sar-start-epoch", "1",
              "--out", str(out)])
    assert not any(modes)  # the training attack (and validation) ran in eval mode
    assert len(calls) == 3  # the term is on in the second epoch only
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[0]["train_sar"] is None and log[1]["train_sar"] > 0
    monkeypatch.setattr(attacks, "pgd", real_pgd)
    monkeypatch.setattr(sar, "sar_loss", real_loss)
    out_wa = tmp_path / "sar_wa"
    sar.main(["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2", "--milestones", "1",
              "--batch-size", "32", "--val-size", "40", "--max-batches", "2", "--wa", "--out", str(out_wa)])
    ck = torch.load(out_wa / "last.pt", weights_only=True)
    assert ck["method"] == "sar" and ck["wa_n"] == 1 and ck["args"]["sar_lambda"] == 0.1
    res = evaluate.main([str(out_wa / "last.pt"), "--weights", "wa", "--attacks", "clean", "pgd", "--n-examples", "8",
                         "--lowpass", "--spectrum"])
    rec = res[str(out_wa / "last.pt")]
    assert set(rec["lowpass"]["accuracy"]) == {"32", "28", "24", "20", "16"}
    assert len(rec["spectrum"]["radial_profile"]) > 10
    assert os.path.getsize(out_wa / "last.spectrum.png") > 1000


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

import iseat  # noqa: E402


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
    model, proxy = models.get_model("cnn", 10), models.get_model("cnn", 10)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    v = iseat.awp_diff(model, proxy, x, y, eta=0.01)
    params = dict(model.named_parameters())
    assert set(v) == {n for n, p in params.items() if p.dim() >= 2} == {"conv1.weight", "conv2.weight", "linear.weight"}
    for n, d in v.items():
        assert torch.allclose(d.norm(), params[n].norm(), rtol=1e-5)
    # the direction is the normalised gradient of the adversarial CE (the proxy's step is eta times it)
    g = torch.autograd.grad(F.cross_entropy(model(x), y), [params["conv1.weight"]])[0]
    assert torch.allclose(v["conv1.weight"], params["conv1.weight"].norm() * g / g.norm(), atol=1e-5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = iseat.perturb(model, v, 7e-3)
    after = model.state_dict()
    for k in before:
        changed = not torch.equal(after[k], before[k])
        assert changed == (k in v), k  # BatchNorm parameters and buffers, and biases, untouched
        if k in v:
            assert torch.allclose(after[k] - before[k], 7e-3 * v[k], atol=1e-7)
    iseat.restore(model, v, 7e-3, saved)
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
    w = torch.tensor(w)
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
    model, proxy = models.get_model("cnn", 10), models.get_model("cnn", 10)
    model.train()
    x, y = torch.rand(12, 3, 8, 8), torch.randint(0, 10, (12,))
    want, want_loss = slow_iseat_step(model, x, y, gamma, lam)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss, _, _ = iseat.train_step(model, proxy, opt, x, y, 8 / 255, 2 / 255, 10, gamma, 0.01, lam)
    assert abs(loss.item() - want_loss) < 1e-5
    for n, p in model.named_parameters():
        assert torch.allclose(p, want[n], atol=1e-6, rtol=1e-5), n


def test_iseat_trains_switches_lambda_at_milestone_and_eval_reads_it(cifar, tmp_path, monkeypatch):
    root, _ = cifar
    calls = []
    real = iseat.rank_weights
    monkeypatch.setattr(iseat, "rank_weights", lambda av: calls.append(len(av)) or real(av))
    base = ["--dataset", "cifar10", "--data-dir", root, "--arch", "cnn", "--epochs", "2", "--milestones", "1",
            "--batch-size", "32", "--val-size", "40", "--max-batches", "3"]
    iseat.main(base + ["--out", str(tmp_path / "i")])
    assert len(calls) == 3  # the smoothing term is on from the first milestone (epoch 2) only
    log = [json.loads(line) for line in open(tmp_path / "i" / "log.jsonl")]
    assert [r["lam"] for r in log] == [0.0, 0.1]
    assert log[0]["train_smooth"] is None and log[1]["train_smooth"] > 0
    iseat.main(base + ["--wa", "--out", str(tmp_path / "iwa")])
    ck = torch.load(tmp_path / "iwa" / "last.pt", weights_only=True)
    assert ck["method"] == "iseat" and ck["wa_n"] == 6 and ck["args"]["awp_gamma"] == 7e-3
    res = evaluate.main([str(tmp_path / "iwa" / "last.pt"), "--weights", "wa", "--attacks", "clean", "cw",
                         "--n-examples", "8"])
    assert 0 <= res[str(tmp_path / "iwa" / "last.pt")]["results"]["cw"]["accuracy"] <= 100


# ---------------------------------------------------------------- several processes (torchrun, gloo on the CPU)

import subprocess  # noqa: E402
import sys  # noqa: E402

LAUNCHER = '''
import importlib, os, sys
sys.path.insert(0, {repo!r})
import torch, torch.nn as nn
import models
if os.environ.get("NO_BN"):  # a model without batch statistics, for the single-process comparison
    def no_bn(arch, n):
        m = models.SmallCNN(n)
        m.bn1, m.bn2 = nn.Identity(), nn.Identity()
        return m
    models.get_model = no_bn
if os.environ.get("CIFAR_ROOT"):  # synthetic CIFAR-10 files: their own checksums, as in the in-process tests
    import hashlib
    import torchvision.datasets as tvd
    folder = os.path.join(os.environ["CIFAR_ROOT"], tvd.CIFAR10.base_folder)
    md5 = lambda n: hashlib.md5(open(os.path.join(folder, n), "rb").read()).hexdigest()
    tvd.CIFAR10.train_list = [[n, md5(n)] for n, _ in tvd.CIFAR10.train_list]
    tvd.CIFAR10.test_list = [[n, md5(n)] for n, _ in tvd.CIFAR10.test_list]
    tvd.CIFAR10.meta = dict(tvd.CIFAR10.meta, md5=md5(tvd.CIFAR10.meta["filename"]))
model, avg = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
torch.save({{"model": model.state_dict(), "wa": avg.module.state_dict() if avg is not None else None}},
           os.path.join(os.environ["STATE_DIR"], "rank%s.pt" % os.environ.get("RANK", "single")))
'''


def launch(tmp_path, method, args, nproc=2, no_bn=False, cifar_root=None):
    """Runs METHOD.main(args) under torchrun (nproc processes) or plainly (nproc 0); returns {rank: state}."""
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER.format(repo=os.path.dirname(os.path.abspath(__file__))))
    state_dir = tmp_path / f"states-{len(list(tmp_path.glob('states-*')))}"
    state_dir.mkdir()
    env = dict(os.environ, STATE_DIR=str(state_dir), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    if no_bn:
        env["NO_BN"] = "1"
    if cifar_root:
        env["CIFAR_ROOT"] = cifar_root
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc else []) + [str(script), method] + args
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return {p.stem[4:]: torch.load(p, weights_only=True) for p in state_dir.glob("rank*.pt")}, r.stdout


def assert_close_states(a, b, atol=0.0):
    for part in ("model", "wa"):
        if a[part] is None:
            continue
        for k in a[part]:
            if atol == 0:
                assert torch.equal(a[part][k], b[part][k]), (part, k)
            else:
                assert torch.allclose(a[part][k].float(), b[part][k].float(), atol=atol), (part, k)


DDP_ARGS = ["--dataset", "synthetic", "--arch", "cnn", "--max-batches", "3", "--val-size", "50",
            "--batch-size", "32", "--milestones", "1"]


@pytest.mark.parametrize("method", ["at", "sar", "iseat"])
def test_torchrun_ranks_end_with_the_same_weights(cifar, tmp_path, method):
    args = DDP_ARGS + ["--epochs", "2", "--wa", "--out", str(tmp_path / "run")]
    if method == "at":  # files on disk: rank 0 reads (or downloads) first, the others wait for it
        args += ["--dataset", "cifar10", "--data-dir", cifar[0]]
    states, out = launch(tmp_path, method, args, cifar_root=cifar[0])
    assert set(states) == {"0", "1"}
    assert_close_states(states["0"], states["1"])  # bitwise: gradients, AWP direction and buffers are shared
    assert out.count("epoch 2 |") == 1  # only rank 0 prints and logs
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "log.jsonl")] == [1, 2]
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.equal(ck["model"][k], states["0"]["model"][k]) for k in ck["model"])


def test_torchrun_matches_single_process_and_resumes(tmp_path):
    # no batch statistics and no random start (eps 0): data-parallel SGD is the same computation as one process
    args = DDP_ARGS + ["--epochs", "2", "--eps", "0", "--wa"]
    ddp, _ = launch(tmp_path, "at", args + ["--out", str(tmp_path / "ddp")], no_bn=True)
    single, _ = launch(tmp_path, "at", args + ["--out", str(tmp_path / "single")], nproc=0, no_bn=True)
    assert_close_states(ddp["0"], single["single"], atol=1e-6)
    # resume under torchrun: 2 + 1 epochs equal 3 epochs straight
    straight, _ = launch(tmp_path, "at", DDP_ARGS + ["--epochs", "3", "--wa", "--out", str(tmp_path / "s")])
    launch(tmp_path, "at", DDP_ARGS + ["--epochs", "2", "--wa", "--out", str(tmp_path / "r")])
    resumed, out = launch(tmp_path, "at", DDP_ARGS + ["--epochs", "3", "--wa", "--resume",
                                                      "--out", str(tmp_path / "r")])
    assert "resumed" in out
    assert_close_states(straight["0"], resumed["0"])
    assert_close_states(resumed["0"], resumed["1"])


def test_bench_mode_prints_throughput_and_keeps_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--bench", "--dataset", "synthetic", "--arch", "cnn", "--max-batches", "2", "--batch-size", "16"]
    at.main(small)
    sar.main(small)
    iseat.main(small + ["--compile"])  # torch.compile with the out-of-place perturbed forward
    out = capsys.readouterr().out
    assert out.count("benchmark:") == 3 and "compile=True" in out
    assert "train_sar" in out and "train_smooth" in out  # the methods' terms are on while benchmarking
    assert list(tmp_path.iterdir()) == []
