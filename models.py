"""Networks used by the adversarial-training scripts.

Every model takes images in [0, 1] (no mean/std normalisation: eps is in pixel units) with `in_channels` channels
(3, or 1 for MNIST and Fashion-MNIST) of any size, and ends with adaptive average pooling, so 28-px MNIST, 32-px
CIFAR and 64-px Tiny ImageNet use the same model.
Parameter names follow the published checkpoints of each architecture, so their weights load as is (after a
DataParallel `module.` or DM-Improves-AT's `module.0.` prefix is stripped, as eval.py does):
  preact_resnet18        Rice et al. 2020 / Wong et al. 2020 (conv1, layer1..4, bn, linear)
  preact_resnet18_iseat  ISEAT's (Li and Spratling 2023): the same keys; a downsampling block's 1x1 shortcut
                         convolves the block's raw input, not the pre-activated one
  resnet18               the common CIFAR ResNet-18 (conv1, bn1, layer1..4, shortcut, linear)
  wrn34_10/28_10         the TRADES / AWP WideResNet (conv1, block1..3, bn1, fc): stride on a block's first conv,
                         the shortcut from the pre-activated input; eval.py drops the unused `sub_block1` of TRADES
                         checkpoints on load
  wrn34_10_iseat/28_10   ISEAT's WideResNet (conv1, layer1..3.blockI, bn1, fc0): stride on a block's second conv,
                         the shortcut from the block's raw input
  wrn28_10_silu/70_16    the SiLU WideResNet of Gowal et al. 2020 / Rebuffi et al. 2021 / Wang et al. 2023
                         (DM-Improves-AT, RobustBench's DMWideResNet; init_conv, layer.G.block.I, batchnorm, logits):
                         (x - mean) / std inside the network with the data set's constants (not in the state dict),
                         BatchNorm momentum 0.01, TensorFlow's "same" padding of the strided convs
  cnn                    a small CNN for CPU runs and tests (43k parameters; 88.2% on Fashion-MNIST after 3 natural
                         epochs on a CPU, 90.0% after 5)
Each released network pools with a fixed window that covers its 32-px map exactly; here the pooling is adaptive, the
same function at 32 px and any other size too.
Bad input raises InputError (one line: the problem and the fix). Checkpoints: save_checkpoint writes atomically;
load_checkpoint reads any file with torch.load(weights_only=True), so nothing but tensors and plain values is ever
unpickled.
"""
import contextlib
import functools
import glob
import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

CKPT_FORMAT = "advtrain-checkpoint-v1"  # what the training scripts write into every checkpoint


class InputError(ValueError):
    """A bad file, flag value or data set, found by models.py or data.py: the message is one line naming the problem
    and the fix. The programs' entry points (cli) print it as `error: ...`; code that imports the modules can catch
    it like any ValueError, and nothing here ends the program."""


class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, raw_shortcut=False):
        super().__init__()
        self.raw_shortcut = raw_shortcut  # ISEAT's: the 1x1 shortcut convolves x, not relu(bn1(x)) as Rice et al.'s
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(x if self.raw_shortcut else out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (preact=False: the common CIFAR ResNet-18; preact=True: PreActResNet-18, with raw_shortcut=True
    ISEAT's)."""

    def __init__(self, num_classes=10, preact=False, in_channels=3, raw_shortcut=False):
        super().__init__()
        block = functools.partial(PreActBlock, raw_shortcut=raw_shortcut) if preact else BasicBlock
        self.preact = preact
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)  # 3x3 stem, no max-pool (CIFAR)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._layer(block, 64, 1)
        self.layer2 = self._layer(block, 128, 2)
        self.layer3 = self._layer(block, 256, 2)
        self.layer4 = self._layer(block, 512, 2)
        if preact:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _layer(self, block, planes, stride):
        layers = []
        for s in (stride, 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        shortcut = x if self.equal else self.convShortcut(o)
        out = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return out + shortcut


class WideGroup(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                               stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth=34, widen=10, num_classes=10, in_channels=3):
        super().__init__()
        assert (depth - 4) % 6 == 0
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.block1 = WideGroup(n, w[0], w[1], 1)
        self.block2 = WideGroup(n, w[1], w[2], 2)
        self.block3 = WideGroup(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():  # the TRADES/AWP initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class IseatWideBlock(nn.Module):
    """ISEAT's WideResNet block: BN-ReLU-conv1 (3x3, stride 1), BN-ReLU-conv2 (3x3, the block's stride), plus the
    block's raw input x, or its 1x1 convolution where the shape changes."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (self.shortcut(x) if hasattr(self, "shortcut") else x)


class IseatWideResNet(nn.Module):
    """ISEAT's WideResNet-depth-widen (TreeLLi/ISEAT src/model/wide_resnet.py): ReLU, PyTorch's default init."""

    def __init__(self, depth=34, widen=10, num_classes=10, in_channels=3):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        for g, stride in enumerate((1, 2, 2)):  # layerG.blockI: the released key names
            blocks = [(f"block{i}", IseatWideBlock(w[g] if i == 0 else w[g + 1], w[g + 1], stride if i == 0 else 1))
                      for i in range(n)]
            setattr(self, f"layer{g + 1}", nn.Sequential(OrderedDict(blocks)))
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc0 = nn.Linear(w[3], num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc0(F.adaptive_avg_pool2d(out, 1).flatten(1))


class SiluWideBlock(nn.Module):
    """DM-Improves-AT's block: conv_0 (3x3, the block's stride) of a = SiLU(batchnorm_0(x)), TensorFlow's "same"
    padding (stride 2: one row and column of zeros at the bottom and right only), then BN-SiLU-conv_1 (3x3); plus x,
    or the 1x1 convolution of a where the width changes."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=0.01)
        self.conv_0 = nn.Conv2d(in_planes, planes, 3, stride, padding=1 if stride == 1 else 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(planes, momentum=0.01)
        self.conv_1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False) if in_planes != planes else None

    def forward(self, x):
        a = F.silu(self.batchnorm_0(x))
        out = self.conv_0(a if self.stride == 1 else F.pad(a, (0, 1, 0, 1)))
        out = self.conv_1(F.silu(self.batchnorm_1(out)))
        return out + (x if self.shortcut is None else self.shortcut(a))


# The mean and std the SiLU WideResNet subtracts and divides by inside, as released for each data set. Any other
# data set gets CIFAR-10's (as DM-Improves-AT's factory gives it), their channel average for 1-channel images.
SILU_NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class SiluWideResNet(nn.Module):
    """The SiLU WideResNet-depth-widen of Gowal et al. 2020, Rebuffi et al. 2021 and Wang et al. 2023
    (DM-Improves-AT core/models/wideresnetwithswish.py; RobustBench's DMWideResNet computes the same function)."""

    def __init__(self, depth=28, widen=10, num_classes=10, in_channels=3, dataset=None):
        super().__init__()
        mean, std = (torch.tensor(v) for v in SILU_NORMALISATION.get(dataset, SILU_NORMALISATION["cifar10"]))
        if in_channels != 3:
            mean, std = mean.mean().expand(in_channels), std.mean().expand(in_channels)
        # buffers that are not in the state dict (as released): they follow .to(device) and .double()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone(), persistent=False)
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.init_conv = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(*[  # layer.G.block.I: the released key names
            nn.Sequential(OrderedDict(block=nn.Sequential(*[
                SiluWideBlock(w[g] if i == 0 else w[g + 1], w[g + 1], stride if i == 0 else 1) for i in range(n)])))
            for g, stride in enumerate((1, 2, 2))])
        self.batchnorm = nn.BatchNorm2d(w[3], momentum=0.01)
        self.logits = nn.Linear(w[3], num_classes)
        for m in self.modules():  # the released initialisation (BatchNorm's 1 and 0 are PyTorch's own)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = F.silu(self.batchnorm(out))
        return self.logits(F.adaptive_avg_pool2d(out, 1).flatten(1))


class SmallCNN(nn.Module):
    """Four 3x3 conv layers with BatchNorm (16, 32 stride 2, 32, 64 stride 2), average pooling to a 4x4 grid and a
    linear layer. The 4x4 grid keeps the coarse layout that a global average would lose (it tells a shirt from a
    coat), and any image size still works. For CPU runs on real images and for the tests."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.conv4 = nn.Conv2d(32, 64, 3, 2, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(64)
        self.linear = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        out = F.relu(self.bn4(self.conv4(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 4).flatten(1))


ARCHS = {  # name: (classes, input channels, data set) -> network
    "preact_resnet18": lambda n, c, d: ResNet18(n, preact=True, in_channels=c),
    "preact_resnet18_iseat": lambda n, c, d: ResNet18(n, preact=True, in_channels=c, raw_shortcut=True),
    "resnet18": lambda n, c, d: ResNet18(n, preact=False, in_channels=c),
    "wrn34_10": lambda n, c, d: WideResNet(34, 10, n, c),
    "wrn28_10": lambda n, c, d: WideResNet(28, 10, n, c),
    "wrn34_10_iseat": lambda n, c, d: IseatWideResNet(34, 10, n, c),
    "wrn28_10_iseat": lambda n, c, d: IseatWideResNet(28, 10, n, c),
    "wrn28_10_silu": lambda n, c, d: SiluWideResNet(28, 10, n, c, d),
    "wrn70_16_silu": lambda n, c, d: SiluWideResNet(70, 16, n, c, d),
    "cnn": lambda n, c, d: SmallCNN(n, c),
}


def gflops(arch, image_shape=(3, 32, 32)):
    """The network's forward GFLOPs for one image, counted by torch's FLOP counter on the meta device (shapes only:
    no weight is drawn, nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as flops, torch.no_grad(), torch.device("meta"):
        get_model(arch, 10, image_shape[0]).eval()(torch.zeros(2, *image_shape))
    return flops.get_total_flops() / 2 / 1e9


CPU_GFLOPS = 300  # what at.py reaches on a 2-core CPU in fp32 (bench.py: 260 to 390 GFLOP/s over the networks)


def cpu_note(device, arch, image_shape, steps, images):
    """On a CPU, a run of more than an hour says so in one line, with the CPU demo as the alternative; it still runs.
    The estimate: `images` training images with a `steps`-step attack, 2 forward-equivalents a step and 3 for the
    training pass, at CPU_GFLOPS."""
    if device.type != "cpu":
        return
    hours = gflops(arch, tuple(image_shape)) * (2 * steps + 3) * images / CPU_GFLOPS / 3600
    if hours > 1:
        print(f"note: this run takes ~{hours:,.0f} hours on this CPU (its FLOP count at {CPU_GFLOPS} GFLOP/s); a look "
              f"in minutes: python at.py --dataset fashion_mnist --arch cnn --eps 0.1 --alpha 0.025 --epochs 2 "
              f"--milestones 1 --max-batches 100 (the README's CPU demo)", flush=True)


def get_model(arch, num_classes, in_channels=3, dataset=None):
    """The network `arch` for `num_classes` classes and `in_channels`-channel images; `dataset` names the data set
    whose normalisation constants the SiLU WideResNets hold (the others ignore it)."""
    if arch not in ARCHS:
        raise InputError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes, in_channels, dataset)


def param_groups(model, bn_weight_decay=None):
    """The parameters as SGD's groups: all in one, or (bn_weight_decay given) BatchNorm's weights and biases in a
    second group with that weight decay (the release of Wang et al. 2023: 0, every other parameter decayed)."""
    if bn_weight_decay is None:
        return [dict(params=list(model.parameters()))]
    bn = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    return [dict(params=[p for p in model.parameters() if id(p) not in bn]),
            dict(params=[p for p in model.parameters() if id(p) in bn], weight_decay=bn_weight_decay)]


@contextlib.contextmanager
def bn_momentum(model, momentum):
    """Inside, every BatchNorm layer of `model` updates its running statistics with `momentum` (None: its own); the
    release of Wang et al. 2023 takes 1.0 for its first training step, so that the statistics start as a batch's."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if momentum is not None \
        else []
    own = [m.momentum for m in layers]
    for m in layers:
        m.momentum = momentum
    try:
        yield
    finally:
        for m, v in zip(layers, own):
            m.momentum = v


def atomic_write(path, write, mode="wb"):
    """write(f) into a temp file beside `path` (NAME.tmpPID), fsync, rename: a write killed at any moment leaves
    `path` as it was, and a temp file that tidy_folder removes."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tidy_folder(folder):
    """Creates `folder` if need be and removes the temp files atomic_write left there when it was killed: NAME.tmpPID
    whose process is gone (a live process's write in progress, e.g. eval.py's beside a checkpoint, is left alone)."""
    os.makedirs(folder, exist_ok=True)
    for tmp in glob.glob(os.path.join(glob.escape(folder), "*.tmp*")):
        pid = tmp.rpartition(".tmp")[2]
        if pid.isdigit() and os.path.isdir("/proc") and not os.path.exists(f"/proc/{pid}"):
            os.remove(tmp)
            print(f"removed {os.path.basename(tmp)}: the temp file of a write that was killed")


def save_checkpoint(obj, path):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, mmap=False):
    """torch.load with weights_only=True; every failure is one line naming the problem and the fix."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path} is empty (0 bytes), not a torch checkpoint; use an intact copy")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
            raise InputError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                             f"values (read with weights_only=True); re-save it as a plain state dict") from None
        raise InputError(f"cannot read {path}: not a torch checkpoint ({first[:100]}); "
                         f"use an intact copy") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"cannot read {path}: the file is truncated or not a torch checkpoint "
                         f"({first[:100]}); use an intact copy") from None
    log = os.path.join(os.path.dirname(path), "log.jsonl")
    if isinstance(ck, dict) and ck.get("format") == CKPT_FORMAT and "optimizer" in ck and "log" not in ck and \
            os.path.exists(log):
        with open(log) as f:  # a last.pt written before the log moved into it: its records are in log.jsonl alone
            ck["log"] = [json.loads(s) for s in f if s.strip()][:ck["epoch"]]
    return ck
