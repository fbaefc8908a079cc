"""Evaluate any checkpoint: clean, FGSM, PGD-20, CW-30 and AutoAttack accuracy on the test split, and whether
those numbers can be trusted (--checks: gradient masking; --curve: accuracy against the radius).

    python eval.py runs/at-cifar10-preact_resnet18                 # a run folder: its best.pt (and wa_best.pt)
    python eval.py last.pt --weights wa --attacks clean pgd aa --n-examples 1000
    python eval.py trades_wrn.pt --arch wrn34_10 --dataset cifar10   # another project's state dict
    python eval.py iseat.pth --arch wrn34_10_iseat --dataset cifar10  # ISEAT's release: {'state_dict': ...}
    python eval.py dm.pt --arch wrn28_10_silu --dataset cifar10       # DM-Improves-AT's (module.0. keys), RobustBench's
    python eval.py runs/at/best.pt --checks                        # can its numbers be trusted?
    python eval.py at/best.pt sar/best.pt --attacks --lowpass --spectrum   # the spectral analysis (spectral.py)

The model is in eval() mode with frozen parameters for every attack, in fp32; every number is printed with its
attack's settings. Nothing computed is lost: each attack's result goes to NAME.eval.json beside the checkpoint as
soon as it is done, stored under the settings that define it (attack_key), and the per-image results of every
finished chunk of --batch-size images to NAME.eval.pt, so the same command after a kill continues where it stopped
and does not run again what is done (--redo does); each chunk draws its randomness from (--seed, attack, chunk), so
a resumed evaluation gives the numbers of an uninterrupted one. The files belong to one checkpoint file (its SHA-256
is stored): results of an older file are moved aside, never mixed in. The `worst case` row counts an image robust
only if it survived every attack stored for the same images at the same radius. --checks and --curve run on the
first --checks-n (500) images, their attacks stored and shared like the others. docs/evaluation.md says more.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
import zlib

import torch
import torch.distributed as dist

import attacks
import checks
from attacks import within
from cmdline import check_device, check_writable, cli, now, parse_args, require, tidy, write_json
import data
import models
import spectral

ATTACKS = ("clean", "fgsm", "pgd", "cw", "aa")  # the default set; aa-rand (AutoAttack with EOT) on request
NAMES = {"clean": "clean", "fgsm": "FGSM", "pgd": "PGD", "cw": "CW", "aa": "AutoAttack", "aa-rand": "AutoAttack rand"}
# normalisations that checkpoints trained on normalised inputs expect inside the model (--normalize)
PRESETS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
           "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
           "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate checkpoints with clean / FGSM / PGD / CW / AutoAttack accuracy")
    p.add_argument("checkpoints", nargs="+", help="this project's checkpoints, or bare state dicts with --arch")
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=ATTACKS + ("aa-rand",),
                   help="aa-rand: AutoAttack version='rand' (APGD-CE and APGD-DLR with EOT) for randomised models")
    p.add_argument("--weights", default="model", choices=["model", "wa"], help="raw weights or the weight average")
    p.add_argument("--arch", default=None, help="for bare state dicts: " + ", ".join(models.ARCHS))
    p.add_argument("--dataset", default=None, help="for bare state dicts: " + ", ".join(data.DATASETS))
    p.add_argument("--data-dir", default=None, help="None: the one the checkpoint was trained with, else data")
    p.add_argument("--n-examples", type=within("[1, inf)", int), default=10000, help="the first N test images")
    p.add_argument("--batch-size", type=within("[1, inf)", int), default=500,
                   help="also the chunk whose results are kept as it ends")
    p.add_argument("--norm", default=None, choices=["Linf", "L2"], help="None: the checkpoint's training norm, "
                                                                         "else Linf")
    p.add_argument("--eps", type=within("(0, inf)", attacks.fraction), default=None,
                   help="radius (None: 8/255 for Linf, 0.5 for L2)")
    p.add_argument("--model", default=None, metavar="FILE.py:FUNCTION",
                   help="a network this project does not define: FUNCTION() in FILE.py returns the nn.Module whose "
                        "state dict the checkpoint holds (FILE.py is executed as code; the weights are read with "
                        "weights_only=True); give --dataset")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="per-channel mean the model was trained to subtract: the normalisation goes inside the "
                        "evaluated model, so that attacks work on [0, 1] pixels")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std, with --mean")
    p.add_argument("--normalize", default=None, choices=sorted(PRESETS), help="--mean/--std of a named preset")
    p.add_argument("--robustbench", action="store_true",
                   help="RobustBench's protocol (standard AutoAttack on the first 10,000 test images, Linf 8/255 or "
                        "L2 0.5) and a model_info JSON for a leaderboard entry, beside the results")
    p.add_argument("--additional-data", type=additional_data, default=None, metavar="none|real|synthetic:N",
                   help="--robustbench: the extra training images of a model this project did not train (N: their "
                        "number, e.g. 20M); for this project's checkpoints it is read from their flags")
    p.add_argument("--alpha", type=within("(0, inf)", attacks.fraction), default=None,
                   help="PGD/CW step (None: eps/4)")
    p.add_argument("--pgd-steps", type=within("[1, inf)", int), default=20, help="PGD's steps")
    p.add_argument("--cw-steps", type=within("[1, inf)", int), default=30, help="CW's steps (the SAR paper's 30)")
    p.add_argument("--restarts", type=within("[1, inf)", int), default=1,
                   help="PGD/CW restarts (an image must survive all)")
    p.add_argument("--redo", action="store_true", help="run the attacks again even where their results are stored")
    p.add_argument("--results-dir", default=None, help="write results to DIR/<checkpoint's folder>/ instead")
    p.add_argument("--lowpass", action="store_true", help="clean and PGD accuracy under centred k x k low-pass filters")
    p.add_argument("--lowpass-window", default="symmetric", choices=["symmetric", "kxk"],
                   help="symmetric: |f| <= k/2 on both axes ((k+1) x (k+1) for even k, a real filter); kxk: exactly "
                        "the k x k centred frequencies of the paper's 'k x k patch', real part of the inverse")
    p.add_argument("--spectrum", action="store_true", help="mean amplitude spectrum of PGD perturbations (+ PNG)")
    p.add_argument("--spectrum-out", default=None, help="PNG path (None: beside the results, or for several "
                                                          "checkpoints in the report folder beside their runs)")
    p.add_argument("--checks", action="store_true", help="the eight gradient-masking checks, PASS / WARN (and the "
                                                         "curve)")
    p.add_argument("--curve", action="store_true", help="accuracy against the radius for PGD and CW (0, eps/4, "
                                                        "eps/2, eps, 2 eps, 4 eps), one picture for all checkpoints")
    p.add_argument("--checks-n", type=within("[1, inf)", int), default=500,
                   help="the first N test images for --checks and --curve")
    p.add_argument("--square-queries", type=within("[1, inf)", int), default=checks.SQUARE_QUERIES,
                   help="queries of the black-box check's Square attack (AutoAttack's: 5000)")
    p.add_argument("--curve-out", default=None, help="PNG path of the curve (None: as --spectrum-out)")
    p.add_argument("--seed", type=within("[0, inf)", int), default=0, help="chunks draw from (seed, attack, chunk)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="torchrun: seconds a process waits for the others (a round of AutoAttack chunks can be long)")
    args = parse_args(p, argv)
    if args.robustbench:  # the protocol, whatever else was asked
        for flag, given, value in (("--n-examples", args.n_examples, 10000),
                                   ("--attacks", args.attacks, ["clean", "aa"])):
            require(given == p.get_default(flag[2:].replace("-", "_")) or given == value,
                    f"--robustbench fixes {flag} to {value}; leave {flag} out")
        args.n_examples, args.attacks = 10000, ["clean", "aa"]
        require(args.eps is None or abs(args.eps - (8 / 255 if args.norm != "L2" else 0.5)) < 1e-9,
                "--robustbench evaluates at Linf 8/255 or L2 0.5; leave --eps out")
    if args.normalize:
        require(args.mean is None and args.std is None,
                "--normalize is a preset of --mean/--std: give one or the other")
        args.mean, args.std = PRESETS[args.normalize]
    require((args.mean is None) == (args.std is None) and (args.mean is None or len(args.mean) == len(args.std)),
            "--mean and --std go together, one value per channel each (e.g. --mean 0.4914 0.4822 0.4465 --std 0.2471 "
            "0.2435 0.2616, or --normalize cifar10)")
    require(args.std is None or all(s > 0 for s in args.std), "--std: every value must be positive")
    require(args.model is None or (args.model.count(":") == 1 and args.model.split(":")[0].endswith(".py")),
            f"--model {args.model}: give FILE.py:FUNCTION, FUNCTION() returning the network")
    args.given_eps, args.given_alpha = args.eps, args.alpha  # per checkpoint, the defaults follow its norm
    norm = args.norm or "Linf"
    args.eps = args.eps if args.eps is not None else (8 / 255 if norm == "Linf" else 0.5)
    args.alpha = args.alpha if args.alpha is not None else args.eps / 4
    require(norm == "L2" or args.eps <= 1,
            f"--eps {attacks.radius(args.eps, digits=6)}: L-inf radii are in (0, 1] pixel units (8/255, not 8)")
    require(args.attacks or args.lowpass or args.spectrum or args.checks or args.curve,
                  "nothing to do: give --attacks, --checks, --curve, --lowpass or --spectrum")
    check_device(args.device)
    return args


def additional_data(s):
    """argparse type of --additional-data: ("none" | "real" | "synthetic", number of images or None)."""
    kind, _, count = s.partition(":")
    scale = {"K": 10**3, "M": 10**6}.get(count[-1:], 1)
    digits = count[:-1] if scale > 1 else count
    if kind not in ("none", "real", "synthetic") or (count and not digits.isdigit()) or (count and kind != "synthetic"):
        raise argparse.ArgumentTypeError(f"{s!r}: give none, real or synthetic:N (N images, e.g. synthetic:20M)")
    return kind, int(digits) * scale if count else None


class Normalized(torch.nn.Module):
    """The evaluated model with its input normalisation inside: attacks and radii stay in [0, 1] pixel units."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


# ---------------------------------------------------------------- AutoAttack and Square, through pyautoattack

def autoattack(model, x, y, eps=8 / 255, norm="Linf", batch_size=500, seed=0, version="standard", n_examples=None,
               log=None, state=None, save=None, rates=None):
    """AutoAttack (Croce & Hein 2020) through pyautoattack==0.2.0: standard = APGD-CE, APGD-T, FAB-T, Square, each
    run on the images still robust after the ones before, as the library's run_standard_evaluation runs them (the
    same batches, each component seeded with `seed` as it starts), one component at a time: `state` (a dict;
    {"done": [...], "robust": per-image flags}) is updated after each component and `save()` called, so that an
    evaluation killed inside a component continues with that component, and the per-image result is that of an
    uninterrupted run. eps, seed and device are passed explicitly (the library's defaults are eps 0.3 and a
    time-based seed); the global random state it reseeds is restored; fp32; gradients FAB leaves on the parameters
    are cleared. `rates` ({component: seconds per image attacked}, kept by the caller across chunks) gives the time
    left in the log line. Returns per-sample correctness on the final, point-wise worst case of the first n_examples
    images."""
    from pyautoattack import AutoAttack
    x, y = x[:n_examples], y[:n_examples]
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    state = {} if state is None else state
    rates = {} if rates is None else rates
    say = log or (lambda m: None)
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with attacks.frozen(model), torch.random.fork_rng(devices=devices), \
                torch.autocast(x.device.type, enabled=False):
            adversary = AutoAttack(model, norm=norm, eps=eps, version=version, device=x.device, seed=seed)
            if "robust" not in state:
                with torch.no_grad():
                    state.update(done=[], robust=attacks.correct(model, x, y, batch_size).cpu())
            robust = state["robust"].to(x.device).clone()
            for attack in adversary.attacks_to_run:
                if attack in state["done"]:
                    continue
                t0 = time.time()
                idx = robust.nonzero()[:, 0]
                for s in range(0, len(idx), batch_size):  # the library's batches of the robust images
                    b = idx[s:s + batch_size]
                    adv = _aa_component(adversary, attack, x[b], y[b]).detach()
                    gap = (adv - x[b]).flatten(1)
                    gap = gap.abs().max(1).values if norm == "Linf" else gap.norm(dim=1)
                    if float(gap.max()) > eps + 1e-5 or float(adv.min()) < 0 or float(adv.max()) > 1:
                        raise RuntimeError(f"AutoAttack's {attack} returned images outside the {norm} ball of radius "
                                           f"{eps:g} or the [0, 1] box: a pyautoattack fault; pin pyautoattack==0.2.0")
                    with torch.no_grad():
                        robust[b[model(adv).argmax(1) != y[b]]] = False
                state["done"] = state["done"] + [attack]
                state["robust"] = robust.cpu().clone()
                if len(idx):
                    rates[attack] = (time.time() - t0) / len(idx)
                if save is not None:
                    save()
                rest = adversary.attacks_to_run[adversary.attacks_to_run.index(attack) + 1:]
                known = not robust.any() or all(a in rates for a in rest)
                left = (f"~{sum(rates.get(a, 0) for a in rest) * int(robust.sum()):.0f} s left in these {len(y)} "
                        f"images" if known else "time left known after the first images")
                say(f"  AutoAttack {attack}: {int(robust.sum())}/{len(y)} images still robust, "
                    f"{time.time() - t0:.0f} s" + (f", {left}" if rest else ""))
    finally:
        for p in model.parameters():
            p.grad = None
    return state["robust"].to(y.device)


def square(model, x, y, eps=8 / 255, norm="Linf", queries=5000, seed=0):
    """AutoAttack's Square (Andriushchenko et al. 2020) alone, a score-based black-box attack: it asks the model for
    scores only, never for a gradient. Set up by the standard AutoAttack itself (its p_init, restarts and seed), with
    `queries` queries; the global random state it reseeds is restored; fp32. Returns per-sample correctness."""
    from pyautoattack import AutoAttack
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    devices = [x.device] if x.device.type == "cuda" else []
    with attacks.frozen(model), torch.random.fork_rng(devices=devices), \
            torch.autocast(x.device.type, enabled=False):
        adversary = AutoAttack(model, norm=norm, eps=eps, version="standard", device=x.device, seed=seed)
        adversary.square.n_queries = queries
        adv = _aa_component(adversary, "square", x, y).detach()
        with torch.no_grad():
            return model(adv).argmax(1) == y


def _aa_component(adversary, attack, x, y):
    """One AutoAttack component on a batch, set up as run_standard_evaluation sets it up."""
    if attack in ("apgd-ce", "apgd-dlr"):
        adversary.apgd.loss = attack[5:]
        adversary.apgd.seed = adversary.get_seed()
        return adversary.apgd.perturb(x, y)
    if attack == "apgd-t":
        adversary.apgd_targeted.seed = adversary.get_seed()
        return adversary.apgd_targeted.perturb(x, y)
    if attack in ("fab", "fab-t"):
        adversary.fab.targeted = attack == "fab-t"
        if attack == "fab-t":
            adversary.fab.n_restarts = 1
        adversary.fab.seed = adversary.get_seed()
        return adversary.fab.perturb(x, y)
    if attack == "square":
        adversary.square.seed = adversary.get_seed()
        return adversary.square.perturb(x, y)
    raise ValueError(f"unknown AutoAttack component {attack!r}")



def external_model(spec):
    """--model FILE.py:FUNCTION: FUNCTION() of FILE.py (executed as code), the network a state dict belongs to."""
    import importlib.util
    path, name = spec.split(":")
    require(os.path.isfile(path), f"--model {spec}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"external_{zlib.crc32(path.encode())}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # its own imports, beside it
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    require(callable(getattr(module, name, None)), f"--model {spec}: {path} defines no function {name}")
    model = getattr(module, name)()
    require(isinstance(model, torch.nn.Module), f"--model {spec}: {name}() returned {type(model).__name__}, not an "
                                                f"nn.Module")
    return model


def clean_state_dict(sd):
    """Accepts what other code saves: DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes,
    DM-Improves-AT's `module.0.` (its network inside an nn.Sequential), AveragedModel's `n_averaged`, and the unused
    `sub_block1` of TRADES WideResNet checkpoints."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        if k != "n_averaged" and not k.startswith("sub_block1."):
            out[k] = v
    if out and all(k.startswith("0.") for k in out):  # nn.Sequential(network): every key under its one child
        out = {k[2:]: v for k, v in out.items()}
    return out


def load_weights(model, sd, what, arch):
    """load_state_dict(strict) with a one-line error when the checkpoint is of another architecture."""
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"error: {what} is not a state dict of tensors; pass a checkpoint written by this project "
                         f"or a plain model.state_dict()")
    sd = clean_state_dict(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        show = lambda ks: ", ".join(ks[:3]) + (", ..." if len(ks) > 3 else "")
        raise SystemExit(f"error: {what} does not fit arch {arch!r}: {len(missing)} missing keys ({show(missing)}), "
                         f"{len(unexpected)} unexpected ({show(unexpected)}), {len(shapes)} of another shape "
                         f"({show(shapes)}); pass the --arch and --dataset it was trained with")
    model.load_state_dict(sd)


def load_model(path, args, device):
    """Builds the model a checkpoint was trained as and loads its weights: this project's checkpoints name their
    network and data set; another project's state dict (bare, or under state_dict / model_state_dict / model) takes
    --arch (or --model) and --dataset. With --mean/--std the normalisation goes inside it. Returns (model, info)."""
    ck = models.load_checkpoint(path)
    if isinstance(ck, dict) and ck.get("format") == models.CKPT_FORMAT and args.model is None:
        arch, dataset = ck["arch"], ck["dataset"]
        for flag, given, saved in (("--arch", args.arch, arch), ("--dataset", args.dataset, dataset)):
            require(given is None or given == saved,
                    f"{path} was trained with {flag} {saved}, not {given}; drop {flag}")
        sd = ck["model"] if args.weights == "model" or ck.get("weights") == "wa" else ck.get("wa_model")
        if sd is None and ck["args"].get("wa"):
            start = (ck["args"]["milestones"] or [0])[0] + 1
            raise SystemExit(f"error: {path} holds no averaged weights yet (epoch {ck['epoch']}; "
                             f"{ck['args']['wa_mode']} averages from epoch {start}); evaluate --weights model, or "
                             f"train past epoch {start - 1}")
        require(sd is not None, f"{path} holds no weight average (trained without --wa); drop --weights wa")
        data_dir = args.data_dir or ck["args"].get("data_dir", "data")
        extra = ck["args"].get("extra_data")  # Carmon et al.'s pickle: real images; an .npz: generated ones
        info = dict(epoch=ck["epoch"], method="natural" if ck["args"].get("eps", 1) == 0 else ck["method"],
                    weights=ck.get("weights", args.weights), num_classes=ck["num_classes"],
                    in_channels=ck.get("in_channels", 3), train_eps=ck["args"].get("eps"),
                    train_norm=ck["args"].get("norm", "Linf"),
                    additional=("none", None) if not extra else ("synthetic" if extra.endswith(".npz") else "real",
                                                                 ck.get("extra_images")))
    else:  # another project's weights: a network of models.py (--arch) or one it defines (--model FILE.py:FUNCTION)
        require(args.model or args.arch, f"{path} is not a checkpoint of this project; pass --arch and --dataset to "
                                         f"read it as a bare state dict")
        require(args.dataset is not None, f"--{'model' if args.model else 'arch'} needs --dataset (the test images "
                                          f"to evaluate {path} on)")
        require(args.dataset in data.DATASETS, f"unknown dataset {args.dataset!r}; choose one of "
                                               f"{', '.join(data.DATASETS)}")
        require(args.weights == "model", f"--weights wa needs a checkpoint of this project; {path} is a bare state "
                                         f"dict")
        arch, dataset, data_dir = args.model or args.arch, args.dataset, args.data_dir or "data"
        sd = next((ck[k] for k in ("state_dict", "model_state_dict", "model") if isinstance(ck, dict) and
                   isinstance(ck.get(k), dict)), ck)  # the wrappers other projects save under
        info = dict(zip(("num_classes", "in_channels"), data.classes_and_channels(dataset)), external=bool(args.model))
    model = external_model(args.model) if args.model else models.get_model(arch, info["num_classes"],
                                                                           info["in_channels"], dataset=dataset)
    load_weights(model, sd, path, arch)
    info.update(arch=arch, dataset=dataset, data_dir=data_dir)
    model = Normalized(model, args.mean, args.std) if args.mean else model
    return model.to(device).eval(), info


def run_folder_checkpoints(path):
    """A run folder stands for its best.pt and, trained with --wa, its wa_best.pt (the weight average at its best),
    each evaluated and labelled; without either (--val-size 0), for its last.pt. A folder with none is refused."""
    if not os.path.isdir(path):
        return [path]
    found = [f for f in ("best.pt", "wa_best.pt") if os.path.isfile(os.path.join(path, f))] or [
        f for f in ("last.pt",) if os.path.isfile(os.path.join(path, f))]
    held = sorted(f for f in os.listdir(path) if f.endswith(".pt") and ".eval." not in f)
    require(found, f"{path} is a folder without best.pt or last.pt; pass one of its checkpoints "
                   f"({', '.join(held) if held else 'it holds none'})")
    print(f"{path} is a run folder: evaluating its " + " and ".join(
        f + (" (the weight average)" if f == "wa_best.pt" else "") for f in found))
    return [os.path.join(path, f) for f in found]


def fingerprint(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def result_files(path, args):
    """(NAME.eval.json, NAME.eval.pt) beside the checkpoint, or under --results-dir/<checkpoint's folder>/."""
    folder = os.path.dirname(os.path.abspath(path))
    if args.results_dir:
        folder = os.path.join(args.results_dir, os.path.basename(folder))
    stem = os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + (".wa" if args.weights == "wa" else ""))
    return stem + ".eval.json", stem + ".eval.pt"


def read_results(json_path, store_path, fp, info):
    """The stored record and per-image results of this checkpoint file; those of an older file (another
    fingerprint) are moved aside, not mixed in. Returns (record, store)."""
    record, store = None, {"fingerprint": fp, "attacks": {}}
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {json_path} ({e}); move it away to start a fresh record") from None
    if os.path.exists(store_path):
        s = models.load_checkpoint(store_path)
        if isinstance(s, dict) and "attacks" in s:  # keyed by settings (files up to 2026-12 by description)
            store = dict(s, attacks={attack_key(e["spec"], e["n_examples"], e["seed"]): e
                                     for e in s["attacks"].values()})
    old = (record or {}).get("fingerprint") or store.get("fingerprint")
    if old and old != fp:
        tag = f"epoch{(record or {}).get('epoch', 'unknown')}-{old[:8]}"
        for p in (json_path, store_path):
            if os.path.exists(p):
                os.replace(p, os.path.join(os.path.dirname(p), os.path.basename(p).replace(".eval.", f".eval.{tag}.")))
        print(f"  the checkpoint has changed since its results were written: the old results were moved to "
              f"{os.path.basename(json_path).replace('.eval.', f'.eval.{tag}.')} (and .pt)")
        record, store = None, {"fingerprint": fp, "attacks": {}}
    record = record or {}
    record.update(info, fingerprint=fp)
    record.setdefault("results", {})
    store["fingerprint"] = fp
    return record, store


def fgsm(model, x, y, eps=8 / 255, norm="Linf"):
    """FGSM (Goodfellow et al. 2015): one step of size eps from x (L2: along the normalised gradient)."""
    return attacks.pgd(model, x, y, eps=eps, alpha=eps, steps=1, random_start=False, norm=norm)


def describe(name, eps, alpha=None, steps=None, norm="Linf", restarts=1, queries=None):
    """An attack's settings, printed beside every number it produces (PGD and CW: attacks.describe)."""
    e = attacks.radius(eps, norm)
    others = {"clean": "clean",
              "square": f"Square-{queries} ({norm}, eps {e}, on the images every white-box attack at eps left robust)",
              "aa": f"AutoAttack standard ({norm}, eps {e})",
              "aa-rand": f"AutoAttack rand ({norm}, eps {e}, APGD-CE and APGD-DLR with EOT over 20 passes)",
              "fgsm": f"FGSM ({norm}, eps {e}, one step of size eps, no random start)"}
    return others[name] if name in others else attacks.describe(name, eps, alpha, steps, norm, restarts)


def spec(name, args, eps=None, steps=None, alpha=None, restarts=None, queries=None):
    """One attack's settings: eval.py's own at --eps unless told otherwise; the step scales with the radius
    (--alpha * eps / --eps), so that the curve's attacks are the same attack at every radius."""
    eps = args.eps if eps is None else eps
    return dict(name=name, norm=args.norm, eps=0.0 if name == "clean" else eps,
                steps={"pgd": args.pgd_steps, "cw": args.cw_steps}.get(name) if steps is None else steps,
                alpha=alpha if alpha is not None else args.alpha if eps == args.eps else args.alpha * eps / args.eps,
                restarts=args.restarts if restarts is None else restarts, queries=queries)


# The settings that define each attack (clean: none; PGD and CW: all of spec's): a result is found by these
DEFINING = {"clean": (), "fgsm": ("norm", "eps"), "aa": ("norm", "eps"), "aa-rand": ("norm", "eps"),
            "square": ("norm", "eps", "queries")}


def attack_key(s, n, seed):
    """The key an attack's result is stored and found under: the settings that define it (spec s, as numbers), the
    first n images and the seed; never its description, which is only printed."""
    fields = [s["name"]] + [f"{k}={s[k]:.8g}" if isinstance(s[k], float) else f"{k}={s[k]}"
                            for k in DEFINING.get(s["name"], ("norm", "eps", "alpha", "steps", "restarts"))]
    return "|".join(fields + [f"n={n}"] + ([f"seed={seed}"] if s["name"] != "clean" else []))


def label(s):
    """An attack's short name, for the tables, the check lines and the pictures: PGD-20, CW-30, FGSM, ..."""
    return {"clean": "clean", "fgsm": "FGSM", "aa": "AutoAttack", "aa-rand": "AutoAttack rand",
            "square": f"Square-{s['queries']}"}.get(s["name"]) or f"{s['name'].upper()}-{s['steps']}"


def chunk_correct(model, s, xb, yb, args, state=None, save=None, rates=None, attack_only=None):
    """Per-image correctness of one chunk under one attack (spec s). AutoAttack keeps its progress in `state` after
    each of its components (save() writes it), so a killed evaluation continues inside the chunk. Square attacks
    only the images flagged in attack_only (the others count as broken)."""
    name = s["name"]
    if name == "clean":
        return attacks.correct(model, xb, yb, len(xb))
    if name == "fgsm":
        return attacks.correct(model, xb, yb, len(xb), attack=fgsm, eps=s["eps"], norm=s["norm"])
    if name in ("aa", "aa-rand"):
        return autoattack(model, xb, yb, s["eps"], s["norm"], batch_size=len(xb), seed=args.seed,
                          version="standard" if name == "aa" else "rand", log=progress, state=state, save=save,
                          rates=rates)
    if name == "square":
        ok = attack_only.to(yb.device).clone()
        if ok.any():
            ok[ok.clone()] = square(model, xb[ok], yb[ok], s["eps"], s["norm"], queries=s["queries"], seed=args.seed)
        return ok
    ok = torch.ones(len(yb), dtype=torch.bool, device=yb.device)
    for _ in range(s["restarts"]):  # each restart attacks the images still robust
        # L-inf: the start is drawn for the whole chunk, so that an image's start does not depend on the others
        u = torch.rand(xb.shape, device=xb.device) if s["norm"] == "Linf" else None
        i = ok.nonzero()[:, 0] if u is not None else torch.arange(len(yb), device=yb.device)
        if len(i):
            ok[i] &= attacks.correct(model, xb[i], yb[i], len(i), attack=attacks.pgd, eps=s["eps"], alpha=s["alpha"],
                                     steps=s["steps"], random_start=True, loss="ce" if name == "pgd" else "cw",
                                     norm=s["norm"], **({} if u is None else dict(noise=u[i])))
    return ok


def run_attack(model, s, x, y, args, store, save, listed=True, attack_only=None):
    """Runs one attack (spec s) chunk by chunk (--batch-size images), skipping chunks already done, saving after
    each. listed: one of the attacks asked for (shown in the results), not only a check's. Returns (key, entry,
    computed): the store entry holds per-image `correct`, per-chunk `done`, the settings and the time spent."""
    n, chunk = len(y), args.batch_size
    key = attack_key(s, n, args.seed)
    desc = describe(s["name"], s["eps"], s["alpha"], s["steps"], s["norm"], restarts=s["restarts"],
                    queries=s["queries"])
    n_chunks = math.ceil(n / chunk)
    entry = store["attacks"].get(key)
    redo = args.redo and key not in store.setdefault("redone", [])  # once per command, though checks share it
    if entry is not None and (redo or (not bool(entry["done"].all()) and entry["chunk"] != chunk)):
        if not redo:
            raise SystemExit(f"error: an interrupted {desc} evaluation used --batch-size {entry['chunk']}; run it "
                             f"again with --batch-size {entry['chunk']} to resume it, or with --redo to start over")
        entry = None
    if entry is None:
        store["redone"].append(key)
        entry = dict(name=s["name"], attack=desc, eps=s["eps"], norm=s["norm"], n_examples=n, seed=args.seed,
                     chunk=chunk, seconds=0.0, correct=torch.zeros(n, dtype=torch.bool),
                     done=torch.zeros(n_chunks, dtype=torch.bool), listed=listed, spec=dict(s))
        if s["name"] != "square":
            entry.update(first_images_of(store, entry))
        store["attacks"][key] = entry
    entry["listed"] = entry.get("listed", True) or listed
    if bool(entry["done"].all()):
        return key, entry, False
    t0, done_before = time.time(), int(entry["done"].sum())
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    todo = [c for c in range(n_chunks) if not entry["done"][c]]
    for first in range(0, len(todo), world):  # a round: one chunk per process, then every result to every process
        mine = None
        if first + rank < len(todo):
            c = todo[first + rank]
            st, e = c * chunk, min(n, (c + 1) * chunk)
            # the chunk's randomness is a function of (seed, attack, chunk): the same whether or not the run was
            # resumed, and whichever process runs it
            torch.manual_seed(args.seed * 1_000_003 + zlib.crc32(s["name"].encode()) + c)
            t_chunk = time.time()
            parts = entry.setdefault("parts", {})  # AutoAttack's per-component progress in the unfinished chunk
            ok = chunk_correct(model, s, x[st:e], y[st:e], args, state=parts.setdefault(c, {}), save=save,
                               rates=entry.setdefault("rates", {}),
                               attack_only=None if attack_only is None else attack_only[st:e])
            mine = (c, ok.cpu(), time.time() - t_chunk)
        gathered = [mine]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
        for c, ok, seconds in (g for g in gathered if g is not None):
            entry["correct"][c * chunk:min(n, (c + 1) * chunk)] = ok
            entry.setdefault("parts", {}).pop(c, None)
            entry["done"][c] = True
            entry["seconds"] = round(entry["seconds"] + seconds, 2)  # compute time, summed over the processes
        if bool(entry["done"].all()):
            entry["date"] = now()  # when the result was completed
        save()
        done_images = torch.repeat_interleave(entry["done"], chunk)[:n]
        acc = 100 * entry["correct"][done_images].float().mean().item()
        elapsed = time.time() - t0
        left = elapsed / (int(entry["done"].sum()) - done_before) * int((~entry["done"]).sum())
        progress(f"  {desc}: {int(done_images.sum())}/{n} images, {acc:.2f} % so far, {elapsed:.0f} s, "
                 f"~{left:.0f} s left" + (f" ({world} processes)" if world > 1 else ""))
    return key, entry, True


def progress(line):
    """A progress line on stderr, from one process only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def percent(correct):
    """Per-image flags as the percentage stored and printed (attacks.accuracy is the training runs' validation)."""
    return round(100 * correct.float().mean().item(), 4)


def first_images_of(store, entry):
    """The per-image result of the same attack on these first images, taken from a stored run on more images whose
    chunks hold exactly these (chunk c's randomness depends on c only, so it is what a run here computes)."""
    n, chunk = entry["n_examples"], entry["chunk"]
    if n % chunk:
        return {}
    for e in store["attacks"].values():
        if (attack_key(e["spec"], 0, e["seed"]) == attack_key(entry["spec"], 0, entry["seed"]) and e["chunk"] == chunk
                and e["n_examples"] > n and bool(e["done"][:n // chunk].all())):
            share = n / e["n_examples"]
            return dict(correct=e["correct"][:n].clone(), done=torch.ones(n // chunk, dtype=torch.bool),
                        seconds=round(e["seconds"] * share, 2), date=e.get("date") or now(),
                        taken_from=f"the first {n} of its {e['n_examples']} images")
    return {}


def worst_key(n, norm, eps):
    return f"worst|norm={norm}|eps={eps:.8g}|n={n}" if eps is not None else f"worst|n={n}"


def summary(store):
    """The JSON view of the complete stored attacks that were asked for: {key: entry without per-image data}, plus,
    for every set of first images and radius with two attacks or more asked for, the worst case over every attack
    stored there (the checks' attacks included: an image counts as robust only if it survived them all)."""
    results, groups = {}, {}
    for key, e in store["attacks"].items():
        if not bool(e["done"].all()):
            continue
        if e.get("listed", True):
            results[key] = dict(name=e["name"], attack=e["attack"], accuracy=percent(e["correct"]),
                                n_examples=e["n_examples"], seed=e["seed"], date=e.get("date"), seconds=e["seconds"],
                                eps=e.get("eps"), norm=e.get("norm"))
        if e["name"] != "clean":
            groups.setdefault((e["n_examples"], e.get("norm"), e.get("eps")), []).append(e)
    for (n, norm, eps), used in groups.items():
        if sum(e.get("listed", True) for e in used) < 2:
            continue
        used = [e for e in store["attacks"].values() if e["name"] == "clean" and e["n_examples"] == n
                and bool(e["done"].all())] + used
        worst = torch.ones(n, dtype=torch.bool)
        for e in used:
            worst &= e["correct"]
        names = ", ".join(label(e["spec"]) + ("" if e["seed"] == used[-1]["seed"] else f" seed {e['seed']}")
                          + ("" if e.get("listed", True) else " [check]") for e in used)
        key = worst_key(n, norm, eps)
        results[key] = dict(name="worst", attack=f"worst case over: {names} (per image)",
                            accuracy=percent(worst), n_examples=n, seed=None,
                            date=now(), seconds=0.0, eps=eps, norm=norm)
    return results


def run_checks(model, x, y, args, store, save, full):
    """The curve's attacks on these images, and with full every check's, through run_attack: stored, resumed, and
    shared with the same attacks asked for directly. Returns (curve record, checks record or None, lines)."""
    n, rs = len(y), checks.radii(args.eps, args.norm)

    used = {}

    def run(s, **kw):
        key, entry, _ = run_attack(model, s, x, y, args, store=store, save=save, listed=False, **kw)
        used[key] = entry
        return entry
    clean = run(spec("clean", args))
    r = dict(clean=clean["correct"], norm=args.norm, eps=args.eps, radii=rs, descs={}, labels={})

    def keep(role, e):  # the role's per-image result, its attack's description (the record) and short name (lines)
        r[role], r["descs"][role], r["labels"][role] = e["correct"], e["attack"], label(e["spec"])
    if full:
        keep("fgsm", run(spec("fgsm", args)))
    for name in ("pgd", "cw"):
        r["curve_" + name] = [clean["correct"]]
        for radius in rs[1:]:
            e = run(spec(name, args, eps=radius))
            r["curve_" + name].append(e["correct"])
            if radius == args.eps:
                keep(name, e)
    curve = dict(norm=args.norm, eps=args.eps, radii=rs, n_examples=n, seed=args.seed, date=now(),
                 pgd_attack=r["descs"]["pgd"], cw_attack=r["descs"]["cw"],
                 pgd=[percent(t) for t in r["curve_pgd"]], cw=[percent(t) for t in r["curve_cw"]])
    lines = [f"  robustness curve, first {n} test images: radius "
             + "  ".join(attacks.radius(v, args.norm) for v in rs)]
    lines += [f"    {r['labels'][k]:<8} " + "  ".join(f"{a:.2f}" for a in curve[k]) + " %" for k in ("pgd", "cw")]
    if not full:
        return curve, None, lines
    r["unbounded_eps"] = checks.unbounded_radius(args.norm, x.shape[1:])
    for role, s in (("unbounded", spec("pgd", args, eps=r["unbounded_eps"])),
                    ("strong", spec("pgd", args, steps=args.pgd_steps * checks.STRONG_STEPS,
                                    alpha=args.alpha / checks.STRONG_STEPS, restarts=checks.STRONG_RESTARTS))):
        keep(role, run(s))
    r["whitebox"] = r["clean"] & r["fgsm"] & r["pgd"] & r["cw"] & r["strong"]
    keep("square", run(spec("square", args, queries=args.square_queries), attack_only=r["whitebox"]))
    r["zero_ce"], r["zero_cw"] = checks.zero_gradients(model, x, y, args.batch_size)
    r["passes"] = checks.repeat_passes(model, x, args.batch_size)
    found = checks.verdicts(r, n)
    warned = [v["check"] for v in found if v["status"] == "WARN"]
    seconds = round(sum(v["seconds"] for v in used.values()), 1)  # the attacks' own time, resumed ones included
    pgd_seconds = used[attack_key(spec("pgd", args), n, args.seed)]["seconds"]
    record = dict(norm=args.norm, eps=args.eps, n_examples=n, seed=args.seed, date=now(), seconds=seconds,
                  warned=warned, checks=found,
                  attacks={d: percent(r[k]) for k, d in r["descs"].items()})
    lines.append(f"  gradient-masking checks, first {n} test images ({args.norm}, eps "
                 f"{attacks.radius(args.eps, args.norm)}, seed {args.seed}; their attacks took {seconds:.0f} s, "
                 f"{r['labels']['pgd']} alone {pgd_seconds:.1f} s):")
    lines += [f"  {v['status']}  {i}. {v['check']}: {v['text']}" for i, v in enumerate(found, 1)]
    lines.append("  " + ("all checks pass" if not warned else f"{len(warned)} of {len(found)} checks warn: the "
                         f"numbers of gradient attacks on this model are not to be trusted as they stand"))
    return curve, record, lines


def picture_path(json_paths, kind, given):
    """Where a picture of one or several checkpoints goes: --*-out; beside one checkpoint's results; for checkpoints
    of one folder, in it; for several run folders, in the report folder beside them (where report.py writes)."""
    if given:
        return given
    if len(json_paths) == 1:
        return os.path.splitext(os.path.splitext(json_paths[0])[0])[0] + f".{kind}.png"
    folders = sorted({os.path.dirname(p) for p in json_paths})
    if len(folders) == 1:
        return os.path.join(folders[0], f"{kind}.png")
    folder = os.path.join(os.path.commonpath([os.path.dirname(f) for f in folders]), "report")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{kind}.png")


def for_checkpoint(base, info):
    """The flags for one checkpoint: --norm defaults to its training norm, --eps and --alpha to that norm's."""
    args = argparse.Namespace(**vars(base))
    args.norm = base.norm or info.get("train_norm") or "Linf"
    args.eps = base.given_eps if base.given_eps is not None else (8 / 255 if args.norm == "Linf" else 0.5)
    args.alpha = base.given_alpha if base.given_alpha is not None else args.eps / 4
    return args


RB_BOARDS = {("cifar10", "Linf"): "8/255", ("cifar10", "L2"): "0.5", ("cifar100", "Linf"): "8/255"}  # and ImageNet
ARCH_NAMES = {"preact_resnet18": "PreActResNet-18", "preact_resnet18_iseat": "PreActResNet-18", "resnet18": "ResNet-18",
              "wrn34_10": "WideResNet-34-10", "wrn28_10": "WideResNet-28-10", "wrn34_10_iseat": "WideResNet-34-10",
              "wrn28_10_iseat": "WideResNet-28-10", "wrn28_10_silu": "WideResNet-28-10", "wrn70_16_silu":
              "WideResNet-70-16", "cnn": "small CNN"}  # as the boards name them (the SiLU networks' entries too)


def robustbench_claim(record, info, args, n, requirements):
    """A RobustBench model_info entry from this evaluation: its fields, accuracies as strings with two decimals;
    what only the user knows (paper, venue, authors, reported number) is marked TODO."""
    ran = {e["name"]: e for e in record["results"].values() if e.get("n_examples") == n and e.get("norm") in
           (args.norm, None) and e["name"] in ("clean", "aa") and (e["name"] == "clean" or
                                                                   abs(e["eps"] - args.eps) < 1e-9)}
    # RobustBench's convention: real extra images (Carmon et al.'s 500K) are additional data; generated ones are not,
    # and a footnote says how many
    kind, count = args.additional_data or info.get("additional") or ("TODO", None)
    notes = list(requirements)
    if kind == "synthetic":
        size = "TODO: N" if not count else f"{count / 1e6:g}M" if count >= 10**6 else f"{count / 1e3:g}K" \
            if count >= 1000 else count
        notes.insert(0, f"It uses additional {size} synthetic images in training.")
    return dict(link="TODO: the paper's URL", name="TODO: the paper's title", authors="TODO: the authors",
                additional_data=kind == "real" if kind != "TODO" else "TODO: true if trained with extra real images "
                                                                      "(or pass --additional-data)",
                number_forward_passes=1, dataset=info["dataset"], venue="TODO: the venue",
                architecture=ARCH_NAMES.get(info["arch"], info["arch"]), eps=RB_BOARDS[info["dataset"], args.norm],
                clean_acc=f"{ran['clean']['accuracy']:.2f}", reported="TODO: the AutoAttack accuracy the paper reports",
                autoattack_acc=f"{ran['aa']['accuracy']:.2f}", footnote=" ".join(notes) or None, unreliable=False)


def main(argv=None):
    base = args = get_args(argv)
    # torchrun: every process evaluates its share of each attack's chunks (a round of one chunk per process at a
    # time); one process reads and writes the results, one prints
    world, rank, device = data.start_processes(args.device, args.timeout)
    main_rank = rank == 0
    if not main_rank:
        sys.stdout = open(os.devnull, "w")
    put = write_json if main_rank else (lambda obj, path: None)  # results are written by one process
    out, spectra, curves, json_paths = {}, [], [], []
    args.checkpoints = [c for p in args.checkpoints for c in run_folder_checkpoints(p)]
    # every results folder (and the pictures') must be writable before any work starts
    for path in args.checkpoints:
        check_writable(os.path.dirname(result_files(path, args)[0]), "--results-dir")
    for flag, given in (("--spectrum-out", args.spectrum and args.spectrum_out),
                        ("--curve-out", (args.curve or args.checks) and args.curve_out)):
        if given:
            check_writable(os.path.dirname(os.path.abspath(given)), flag)
    for path in base.checkpoints:
        model, info = load_model(path, base, device)
        args = for_checkpoint(base, info)
        require(not args.robustbench or (info["dataset"], args.norm) in RB_BOARDS,
                f"--robustbench: {path} is {info['dataset']} {args.norm}, and RobustBench's boards are CIFAR-10 Linf "
                f"and L2, CIFAR-100 Linf and ImageNet Linf")
        json_path, store_path = result_files(path, args)
        json_paths.append(json_path)
        fp = fingerprint(path)
        ds = data.load(info["dataset"], info["data_dir"], val_size=0, device=device)
        n = min(args.n_examples, len(ds["test_x"]))
        x, y = ds["test_x"][:n], ds["test_y"][:n]
        weights = info.get("weights", args.weights)
        more = f" (all there are; --n-examples {args.n_examples} asked for more)" if n < args.n_examples else ""
        sets = [f"first {n} images{more}"] if args.attacks or args.lowpass or args.spectrum else []
        sets += [f"--checks/--curve on the first {min(args.checks_n, n)}"] if args.checks or args.curve else []
        print(f"{path}: {info['arch']} ({info.get('method', 'state dict')}, {weights} weights, "
              f"epoch {info.get('epoch', '?')}), {info['dataset']} test, " + "; ".join(sets))
        shown_as = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path)) + (
            " (wa)" if args.weights == "wa" else "")  # in the pictures
        # one process reads (and moves aside the results of an older checkpoint file), every process gets the same
        got = [read_results(json_path, store_path, fp, dict(checkpoint=path, **info)) if main_rank else None]
        if world > 1:
            dist.broadcast_object_list(got, 0)
        record, store = got[0]
        store["redone"] = []  # the attacks this command has run afresh
        if main_rank:
            models.tidy_folder(os.path.dirname(json_path))

        def save():  # per-image results after every chunk, the JSON view after every attack; both atomic, by one
            if main_rank:  # process
                models.save_checkpoint(store, store_path)

        def write():  # results without per-image data (older files) stay; the stored attacks' are brought up to date
            stored = {(e["attack"], e["n_examples"], e["seed"]) for e in store["attacks"].values()}
            old = {k: v for k, v in record["results"].items() if v.get("name") != "worst" and
                   (v.get("attack"), v.get("n_examples"), v.get("seed")) not in stored}
            record["results"] = {**old, **summary(store)}
            put(record, json_path)

        ran = {}
        for name in args.attacks:
            key, entry, computed = run_attack(model, spec(name, args), x, y, args, store=store, save=save)
            write()
            r = record["results"][key]
            ran[name] = r
            when = "" if computed else f"   (stored {r['date']}; --redo runs it again)"
            print(f"  {r['attack']:<66} {r['accuracy']:6.2f} %  {r['seconds']:8.1f} s{when}", flush=True)
        if args.attacks and worst_key(n, args.norm, args.eps) in record["results"]:
            r = record["results"][worst_key(n, args.norm, args.eps)]
            ran["worst"] = r
            print(f"  {r['attack']}: {r['accuracy']:.2f} %")
        if args.checks or args.curve:
            m = min(args.checks_n, n)
            curve, found, lines = run_checks(model, x[:m], y[:m], args, store=store, save=save, full=args.checks)
            tag = f"({args.norm}, eps {attacks.radius(args.eps, args.norm)}) | first {m} test images | seed {args.seed}"
            record.setdefault("curve", {})["curve " + tag] = curve
            if found is not None:
                record.setdefault("checks", {})["checks " + tag] = found
            write()
            print("\n".join(lines), flush=True)
            curves.append((shown_as, args.norm, curve["radii"],
                           curve["pgd"], curve["cw"], info.get("train_eps")))
            ran.update(curve=curve, checks=found)
        pgd_name = describe("pgd", args.eps, args.alpha, args.pgd_steps, args.norm)
        if args.lowpass:
            torch.manual_seed(args.seed)
            ks = spectral.lowpass_ks(x.shape[-1])
            lp = spectral.lowpass_accuracy(model, x, y, ks, args.eps, args.alpha, steps=args.pgd_steps,
                                           batch_size=args.batch_size, window=args.lowpass_window)
            print(f"  low-pass k x k ({args.lowpass_window} window)   clean %    PGD %   ({pgd_name}, crafted on "
                  f"unfiltered images)")
            for k, (c, r) in lp.items():
                print(f"  k = {k:<28} {c:7.2f}  {r:7.2f}")
            key = f"{pgd_name} | {args.lowpass_window} window | first {n} test images | seed {args.seed}"
            record.setdefault("lowpass", {})[key] = dict(
                attack=pgd_name, window=args.lowpass_window, n_examples=n, seed=args.seed, date=now(),
                accuracy={str(k): dict(clean=round(c, 4), pgd=round(r, 4)) for k, (c, r) in lp.items()})
            put(record, json_path)
        if args.spectrum:
            torch.manual_seed(args.seed)
            spec_map, prof = spectral.perturbation_spectrum(model, x, y, args.eps, args.alpha, steps=args.pgd_steps,
                                                            batch_size=args.batch_size)
            print("  perturbation spectrum, radial profile (low to high frequency): "
                  + " ".join(f"{v:.3g}" for v in prof.tolist()))
            key = f"{pgd_name} | first {n} test images | seed {args.seed}"
            record.setdefault("spectrum", {})[key] = dict(
                attack=pgd_name, n_examples=n, seed=args.seed, date=now(),
                amplitude=tidy(spec_map.tolist(), 5), radial_profile=tidy(prof.tolist(), 5))
            put(record, json_path)
            spectra.append((shown_as, spec_map, prof))
        if args.robustbench:
            m = min(args.checks_n, n)  # what RobustBench requires of a model, measured on the first images
            zero_ce, zero_cw = checks.zero_gradients(model, x[:m], y[:m], args.batch_size)
            diff, scale, changed = checks.repeat_passes(model, x[:m], args.batch_size)
            zeros = int((zero_ce & zero_cw).sum())
            requirements = [f"not deterministic: {changed} of {m} predictions changed between two passes (use "
                            f"--attacks aa-rand)"] if diff > 1e-4 * (1 + scale) or changed else []
            requirements += [f"zero input gradients (CE and margin) on {zeros} of {m} images"] if zeros else []
            print(f"  RobustBench's requirements, first {m} test images: inputs in [0, 1] (normalisation inside the "
                  f"model{': --mean/--std' if args.mean else ''}), deterministic "
                  f"({'no: ' + str(changed) + ' predictions changed' if requirements and changed else 'yes'}), "
                  f"non-zero gradients ({'no: ' + str(zeros) + ' images' if zeros else 'yes'})")
            claim = robustbench_claim(record, info, args, n, requirements)
            claim_path = json_path.replace(".eval.json", ".robustbench.json")
            put(claim, claim_path)
            record["robustbench"] = dict(claim=claim_path, requirements=requirements, checked_on=m, date=now(),
                                         protocol=f"AutoAttack standard, {args.norm} eps "
                                                  f"{attacks.radius(args.eps, args.norm)}, first {n} test images")
            put(record, json_path)
            print(f"  RobustBench model_info: {claim_path} (fill in the fields marked TODO)")
        print(f"  results: {json_path}")
        out[path] = dict(record, ran=ran)
    if spectra and main_rank:
        png = picture_path(json_paths, "spectrum", args.spectrum_out)
        spectral.plot_spectra(spectra, png)
        print(f"perturbation spectra: {png}")
    if curves and main_rank:
        png = picture_path(json_paths, "curve", args.curve_out)
        checks.plot_curves(curves, png, names=(label(spec("pgd", args)), label(spec("cw", args))))
        print(f"robustness curve: {png}")
    return out


if __name__ == "__main__":
    cli(main)
