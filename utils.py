"""The plumbing every script shares: flag checks, the output folder, resume, checkpoints, the per-epoch log, torchrun.

Each method file keeps its algorithm, its loop and its header in view and calls these plain functions for what is
identical between methods. Checkpoints are written atomically (temp file, fsync, rename) and read with
torch.load(weights_only=True), so a killed run never leaves a half-written file and nothing but tensors and plain
values is ever unpickled. Every bad input ends in one line naming the problem and the fix (printed once under
torchrun).
"""
import argparse
import datetime
import glob
import inspect
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import warnings
import zipfile

import torch
import torch.distributed as dist

# torch.distributed.nn.functional (collectives with autograd) is marked deprecated in favour of a private module;
# it is the public API that works on every torch this project supports
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated")

import attacks
import data

CKPT_FORMAT = "advtrain-checkpoint-v1"


# ---------------------------------------------------------------- command line

def fraction(s):
    """argparse type for radii and steps: '8/255' or a plain number, both in [0,1] pixel units."""
    try:
        num, _, den = s.partition("/")
        v = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a number or a fraction like 8/255") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def parse_args(parser, argv=None):
    """parser.parse_args, with every argparse error as one line (no usage block). Negative fractions (-8/255) are
    read as values, not as unknown flags, so that the range checks can name the problem."""
    def error(message):
        raise SystemExit(f"error: {message} (--help lists the flags)")
    parser.error = error
    if hasattr(parser, "_negative_number_matcher"):
        parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(/[\d.]+)?$")
    return parser.parse_args(argv)


def train_flags(p, method, epochs, milestones, val_steps=10, val_size=1000, wa_mode="ema"):
    """The flags every method shares, with the method's own defaults (its paper's schedule and validation)."""
    import data
    import models
    p.add_argument("--dataset", default="cifar10", help=", ".join(data.DATASETS))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--arch", default="preact_resnet18", help=", ".join(models.ARCHS))
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--milestones", type=int, nargs="*", default=milestones,
                   help="lr x0.1 after each of these epochs")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split across torchrun processes")
    p.add_argument("--eps", type=fraction, default="8/255", help="L-inf radius (8/255 or a number; 0: natural)")
    p.add_argument("--alpha", type=fraction, default="2/255", help="PGD step size")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    p.add_argument("--val-steps", type=int, default=val_steps, help="PGD steps of validation")
    p.add_argument("--val-size", type=int, default=val_size, help="held-out training images for choosing best.pt")
    p.add_argument("--pad-mode", default="zero", choices=["zero", "reflect"], help="padding of the random crop")
    p.add_argument("--rotate", type=float, default=0.0, help="random rotation, max degrees (Rice's CIFAR-100: 15)")
    p.add_argument("--wa", action="store_true", help="keep a weight average (see wa.py) and validate it too")
    p.add_argument("--wa-mode", default=wa_mode, choices=["ema", "swa"])
    p.add_argument("--wa-decay", type=float, default=0.999)
    p.add_argument("--wa-warmup", action="store_true", help="EMA decay min(d, (1+t)/(10+t))")
    p.add_argument("--wa-bn", default="clean", choices=["clean", "adversarial"],
                   help="images of SWA's BatchNorm recomputation (adversarial: PGD examples, for PGD-AT)")
    p.add_argument("--out", default=None, help=f"output folder (default runs/{method}-DATASET-ARCH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (evaluation stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training and attacks")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--bench", action="store_true",
                   help="measure images/s: 2 epochs of --max-batches (20) batches, no validation, nothing kept")
    p.add_argument("--sync-bn", action="store_true",
                   help="torchrun: BatchNorm statistics over the global batch (default: each process's own share)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="torchrun: seconds a process waits for the others before it gives up")


def parse_train_args(p, argv, method):
    """Parses the flags, fills in the default --out and checks the shared flags (one line per problem);
    --bench overrides what it needs."""
    args = parse_args(p, argv)
    args.out = args.out or os.path.join("runs", f"{method}-{args.dataset}-{args.arch}")
    check_train_args(args)
    late = [m for m in args.milestones if m >= args.epochs]
    given = any(a == "--milestones" or a.startswith("--milestones=") for a in (sys.argv[1:] if argv is None else argv))
    require(not (late and given), f"--milestones {' '.join(map(str, args.milestones))}: the lr decays after these "
                                  f"epochs, so each must be below --epochs {args.epochs}; drop "
                                  f"{' '.join(map(str, late))} or train longer")
    if late and not args.bench and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: --epochs {args.epochs} ends before the lr decays at {' '.join(map(str, late))} (the default "
              f"--milestones); pass --milestones to decay within the run")
    if args.bench:
        bench_settings(args)
    return args


def show(v):
    """A radius in an error message: as the user would write it, 6 significant digits otherwise."""
    return attacks.radius(v, digits=6)


def require(ok, message):
    if not ok:
        raise SystemExit(f"error: {message}")


def check_device(name):
    """--device: a torch device that exists on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(),
                f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
        require(device.index is None or device.index < torch.cuda.device_count(),
                f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible; use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}")
    return device


def check_train_args(args):
    """The flags every method shares; one line per problem, naming the fix."""
    import models
    require(args.dataset in data.DATASETS, f"unknown dataset {args.dataset!r}; choose one of {', '.join(data.DATASETS)}")
    require(args.arch in models.ARCHS, f"unknown arch {args.arch!r}; choose one of {', '.join(models.ARCHS)}")
    require(args.epochs >= 1, f"--epochs {args.epochs}: train at least 1 epoch")
    require(args.batch_size >= 1, f"--batch-size {args.batch_size}: use a positive batch size, e.g. 128")
    require(args.max_batches is None or args.max_batches >= 1,
            f"--max-batches {args.max_batches}: use a positive number of batches, or leave it out for whole epochs")
    require(0 <= args.eps <= 1, f"--eps {show(args.eps)}: radii are in [0,1] pixel units (8/255, not 8); use 0 .. 1")
    require(0 < args.alpha <= 1, f"--alpha {show(args.alpha)}: the step is in [0,1] pixel units (2/255, not 2); "
                                 f"use 0 < alpha <= 1")
    require(args.steps >= 0, f"--steps {args.steps}: use 0 or more attack steps")
    require(args.eps == 0 or args.steps >= 1,
            f"--steps 0 with --eps {show(args.eps)}: give the attack steps, or --eps 0 for natural training")
    require(args.val_steps >= 1, f"--val-steps {args.val_steps}: validation PGD needs at least 1 step")
    require(args.val_size >= 0, f"--val-size {args.val_size}: use 0 (no validation) or more held-out images")
    require(args.lr > 0, f"--lr {args.lr:g}: use a positive learning rate")
    require(0 <= args.momentum < 1, f"--momentum {args.momentum:g}: use 0 <= momentum < 1")
    require(args.wd >= 0, f"--wd {args.wd:g}: use a weight decay >= 0")
    require(all(m >= 1 for m in args.milestones) and args.milestones == sorted(set(args.milestones)),
            f"--milestones {' '.join(map(str, args.milestones))}: give increasing epochs >= 1")
    require(args.timeout > 0, f"--timeout {args.timeout:g}: use a positive number of seconds")
    require(0 < args.wa_decay < 1, f"--wa-decay {args.wa_decay:g}: use a decay in (0, 1), e.g. 0.999")
    require(0 <= args.rotate <= 180, f"--rotate {args.rotate:g}: use 0 .. 180 degrees")
    require(args.seed >= 0, f"--seed {args.seed}: use a seed >= 0")
    check_device(args.device)


def bench_settings(args):
    """--bench: 2 epochs of --max-batches (20) batches, no validation, nothing kept. The first epoch warms up
    (cudnn autotuning, compilation); the second is the measurement."""
    import tempfile
    args.epochs, args.max_batches, args.val_size = 2, args.max_batches or 20, 0
    args.out, args.resume = tempfile.mkdtemp(prefix="bench-"), False


def cli(main):
    """Entry point of every script. A SystemExit with a message prints that one line; under torchrun only rank 0
    prints it (all ranks run the same checks). A process that lost the others (a peer killed, a node gone) ends
    with one line too, after at most --timeout seconds, so that torchrun can restart the group."""
    try:
        main()
    except SystemExit as e:
        for folder in MADE_FOLDERS:  # a run that could not start (missing data, ...) leaves no empty folder behind
            if os.path.isdir(folder) and not any(files for _, _, files in os.walk(folder)):
                shutil.rmtree(folder)
        if isinstance(e.code, str) and int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(1) from None
        raise
    except RuntimeError as e:  # a collective that failed: DistBackendError and gloo's errors are RuntimeErrors
        text = str(e)
        lost = isinstance(e, getattr(dist, "DistError", ())) or any(
            w in text for w in ("gloo", "NCCL", "Connection", "timed out", "Timed out", "closed by peer"))
        if "WORLD_SIZE" not in os.environ or not lost:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SystemExit(f"error: rank {os.environ.get('RANK', '?')} lost contact with the other processes ({first}); "
                         f"run under torchrun --max-restarts N with --resume to continue from last.pt") from None


# ---------------------------------------------------------------- the output folder and resume

def check_writable(folder, flag="--out"):
    """Creates `folder` and proves a file can be written there, before any work starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write to {folder} ({e.strerror}); pass {flag} to a writable folder") from None


def remove_stale_temp_files(folder):
    """Temp files of atomic writes (NAME.tmpPID) whose process is gone: a write that was killed. Returns them."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), "*.tmp*")):
        m = re.search(r"\.tmp(\d+)$", path)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:  # another user's live process
            alive = True
        if not alive:
            os.remove(path)
            removed.append(os.path.basename(path))
    return removed


def _wa_text(a):
    return f"--wa --wa-mode {a.get('wa_mode')}" if a.get("wa") else "no --wa"


MADE_FOLDERS = []  # output folders this process created


def start_run(args, method, main_rank):
    """Prepares args.out before the work starts and says what happens to what is there. Returns the state of
    OUT/last.pt to resume from, or None for a fresh start.
      - OUT must be writable (checked now, not after the first epoch);
      - temp files of writes that were killed are removed;
      - an existing run is only continued with --resume, and only by the same method, arch and data set;
      - a weight average is never dropped or restarted silently: the --wa setting must match the checkpoint's;
      - a fresh start in a folder without last.pt does not inherit a dead run's log lines."""
    if main_rank:
        top = os.path.abspath(args.out)
        while not os.path.exists(os.path.dirname(top)):
            top = os.path.dirname(top)
        if not os.path.exists(top):
            MADE_FOLDERS.append(top)  # removed again if the run fails before writing anything (see cli)
        check_writable(args.out)
        for name in remove_stale_temp_files(args.out):
            print(f"removed {name}: the temp file of a write that was killed")
    last_path = os.path.join(args.out, "last.pt")
    if not os.path.exists(last_path):
        if args.resume and main_rank:
            print(f"--resume: nothing to resume in {args.out} (no last.pt); starting a new run")
        log = os.path.join(args.out, "log.jsonl")
        if main_rank and os.path.exists(log):
            with open(log) as f:
                n = sum(1 for line in f if line.strip())
            os.remove(log)
            print(f"removed {n} log line(s) of an earlier run in {args.out} that ended before writing last.pt")
        return None
    require(args.resume, f"{args.out} already holds a run (last.pt); pass --resume to continue it or --out for a new "
                         f"one")
    ck = load_checkpoint(last_path)
    require(isinstance(ck, dict) and ck.get("format") == CKPT_FORMAT and "optimizer" in ck,
            f"{last_path} is not a last.pt written by this project; pass --out for a new run")
    saved = ck["args"]
    require((ck["method"], ck["arch"], ck["dataset"]) == (method, args.arch, args.dataset),
            f"{last_path} holds {'an' if ck['method'][0] in 'aeiou' else 'a'} {ck['method']}.py run of {ck['arch']} on {ck['dataset']}; resume it with "
            f"python {ck['method']}.py --arch {ck['arch']} --dataset {ck['dataset']}, or pass --out for a new run")
    if bool(saved.get("wa")) != bool(args.wa) or (args.wa and saved.get("wa_mode") != args.wa_mode):
        raise SystemExit(f"error: {last_path} was trained with {_wa_text(saved)}; resume it with the same (changing "
                         f"it would drop or restart the weight average), or pass --out for a new run")
    if main_rank:
        changed = [f"--{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in sorted(vars(args).items())
                   if k in saved and saved[k] != v and k not in ("resume",)]
        if changed:
            print("resuming with changed flags: " + ", ".join(changed))
    return ck


def resume(ck, args, model, opt, avg, main_rank):
    """Loads the last.pt that start_run returned (if any) into the run's objects and drops log lines of epochs that
    will be run again. Returns (first epoch to run, [best, wa_best]) (the validation scores of best.pt and
    wa_best.pt)."""
    if ck is None:
        return 0, [-1.0, -1.0]
    path = os.path.join(args.out, "last.pt")
    load_weights(model, ck["model"], path, ck["arch"])
    opt.load_state_dict(ck["optimizer"])
    if avg is not None and ck.get("wa_model") is not None:
        load_weights(avg.module, ck["wa_model"], path + " (wa_model)", ck["arch"])
        avg.n_averaged.fill_(ck["wa_n"])
    if main_rank:
        trim_log(args.out, ck["epoch"])
        left = "" if ck["epoch"] < args.epochs else f"; nothing left to train with --epochs {args.epochs}"
        print(f"resumed {path} at epoch {ck['epoch']}{left}")
    return ck["epoch"], [ck["best"], ck["wa_best"]]


def meta(args, method, ds, epoch, rec):
    """What every checkpoint carries besides its weights."""
    return dict(format=CKPT_FORMAT, method=method, arch=args.arch, dataset=args.dataset,
                num_classes=ds["num_classes"], in_channels=ds["channels"], epoch=epoch, args=vars(args), metrics=rec)


def save_epoch(args, info, model, opt, avg, best, wa_best):
    """End of an epoch (rank 0): best.pt / wa_best.pt when validation improved, then last.pt; each written atomically.
    The criterion is validation PGD accuracy (Rice et al.), or clean accuracy when training naturally (--eps 0).
    A weight average that holds no weights yet (SWA before its first epoch) is saved as None, never as weights.
    Returns the new (best, wa_best)."""
    rec = info["metrics"]
    score = rec["val_pgd"] if rec.get("val_pgd") is not None else rec.get("val_clean")
    wa_score = rec["wa_val_pgd"] if rec.get("wa_val_pgd") is not None else rec.get("wa_val_clean")
    if score is not None and score > best:
        best = score
        save_checkpoint(dict(info, model=model.state_dict()), os.path.join(args.out, "best.pt"))
    has_wa = avg is not None and int(avg.n_averaged) > 0
    if wa_score is not None and has_wa and wa_score > wa_best:
        wa_best = wa_score
        save_checkpoint(dict(info, model=avg.module.state_dict(), weights="wa", wa_n=int(avg.n_averaged)),
                        os.path.join(args.out, "wa_best.pt"))
    save_checkpoint(dict(info, model=model.state_dict(), optimizer=opt.state_dict(), best=best, wa_best=wa_best, wa_model=avg.module.state_dict() if has_wa else None,
                         wa_n=int(avg.n_averaged) if has_wa else 0), os.path.join(args.out, "last.pt"))
    return best, wa_best


def validate(model, ds, eps, alpha, steps):
    """Clean and PGD-`steps` accuracy (%) on the held-out split, the model frozen in eval mode, fp32, random start.
    The PGD accuracy is None for natural training (eps 0): there is no attack to report."""
    if len(ds["val_x"]) == 0:
        return None, None
    clean = attacks.correct(model, ds["val_x"], ds["val_y"]).float().mean().item()
    if eps == 0:
        return 100 * clean, None
    rob = attacks.correct(model, ds["val_x"], ds["val_y"], attack=attacks.pgd, eps=eps, alpha=alpha,
                          steps=steps).float().mean().item()
    return 100 * clean, 100 * rob


def bn_batches(ds, args, memory_format, model):
    """Training batches (crop + flip, batch 512) for SWA's BatchNorm recomputation: as many images as one training
    epoch sees (so --max-batches and --bench limit it too), with a progress line on a terminal. --wa-bn clean (the
    SAR paper's WA) passes the clean images; --wa-bn adversarial passes PGD examples of them (the training attack's
    eps, step and steps, random start) crafted against the current `model` in eval mode: the statistics a model
    trained only on adversarial batches (PGD-AT) was trained with."""
    n_img = len(ds["train_x"]) if args.max_batches is None else min(len(ds["train_x"]),
                                                                     args.max_batches * args.batch_size)
    nb = data.num_batches(n_img, 512)
    # with --sync-bn under torchrun the pass is shared: each rank takes its share of every batch and the statistics
    # are those of the whole batch; otherwise every rank passes every batch
    rank, world = (dist.get_rank(), dist.get_world_size()) if args.sync_bn and dist.is_initialized() else (0, 1)
    adversarial = args.wa_bn == "adversarial" and args.eps > 0

    def batches():
        t0 = time.time()
        for i, (x, y, noise) in enumerate(data.batches(
                ds["train_x"], ds["train_y"], 512, shuffle=True, augment=ds["augment"], max_batches=nb, rank=rank,
                world=world, memory_format=memory_format, noise="uniform" if adversarial else None)):
            if adversarial:
                with attacks.frozen(model), torch.enable_grad():  # the pass itself runs under no_grad
                    x = attacks.pgd(model, x, y, args.eps, args.alpha, args.steps, random_start=True, noise=noise)
            yield x, y
            progress(i + 1, nb, t0, "SWA: recomputing BatchNorm statistics,")
    return batches


def describe_validation(args):
    return "clean" if args.eps == 0 else f"clean + PGD-{args.val_steps}"


def describe_wa(args):
    if not args.wa:
        return "off"
    if args.wa_mode == "swa":
        start = args.milestones[0] + 1 if args.milestones else 1
        return (f"swa (equal average of the end-of-epoch weights from epoch {start}, the first after an lr decay; "
                f"BatchNorm recomputed on {args.wa_bn} images)")
    return f"ema (decay {args.wa_decay:g} after every step{', warmed up' if args.wa_warmup else ''})"


# ---------------------------------------------------------------- checkpoints

def atomic_write(path, write, mode="wb"):
    """write(f) into a temp file beside `path` (NAME.tmpPID), fsync, rename: a write killed at any moment leaves
    `path` as it was (and a temp file that the next run clears, see remove_stale_temp_files)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


def load_checkpoint(path, mmap=False):
    """torch.load with weights_only=True; every failure is one line naming the problem and the fix."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: {path} is empty (0 bytes), not a torch checkpoint; use an intact copy")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
            raise SystemExit(f"error: refusing to load {path}: it holds Python objects other than tensors and plain "
                             f"values (read with weights_only=True); re-save it as a plain state dict") from None
        raise SystemExit(f"error: cannot read {path}: not a torch checkpoint ({first[:100]}); "
                         f"use an intact copy") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: cannot read {path}: the file is truncated or not a torch checkpoint "
                         f"({first[:100]}); use an intact copy") from None


def clean_state_dict(sd):
    """Accepts what other code saves: DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes,
    AveragedModel's `n_averaged`, and the unused `sub_block1` of TRADES WideResNet checkpoints."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        if k != "n_averaged" and not k.startswith("sub_block1."):
            out[k] = v
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


# ---------------------------------------------------------------- the per-epoch log

UNITS = {"time": "s", "train_time": "s", "img_per_s": "img/s"}


def tidy(value, digits=6):
    """Rounds floats to `digits` significant digits (no 7.999999821186066 or 0.010000000000000002 in the logs)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: tidy(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(v, digits) for v in value]
    return value


def log_epoch(out_dir, record):
    """One printed line and one JSON object per epoch (log.jsonl in the output folder)."""
    parts = []
    for k, v in record.items():
        if v is None:
            continue
        unit = UNITS.get(k, "%" if k.endswith(("_acc", "_clean", "_pgd")) else "")
        parts.append(f"{k} {v:.4g}{' ' + unit if unit else ''}" if isinstance(v, float) else f"{k} {v}")
    print(" | ".join(parts), flush=True)
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def trim_log(out_dir, start_epoch):
    """On resume, drop log lines of epochs that are about to be run again (a run killed after logging)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= start_epoch]
    with open(path, "w") as f:
        f.writelines(keep)


def now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def progress(i, n, t0, prefix=""):
    """A self-overwriting progress line on a terminal; reads no GPU value, so it costs no host sync."""
    if sys.stderr.isatty() and (i % 10 == 0 or i == n):
        sys.stderr.write(f"\r{prefix} {i}/{n} batches, {time.time() - t0:.0f} s" + (" " * 8 + "\r" if i == n else ""))
        sys.stderr.flush()


# ---------------------------------------------------------------- the training loop's plumbing

def memory_format(device):
    """channels_last on GPUs (faster convolutions under autocast), the default layout elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def build(args, ds, device, world):
    """The model, the network the training step calls, the optimiser and the weight average.
    `model` is the plain module: its weights are optimised, averaged, validated and saved. `net` is the same module
    as the step calls it: with --sync-bn its BatchNorm layers compute statistics over the global batch, with
    --compile it is compiled, and under torchrun it is wrapped in DistributedDataParallel, which averages the
    gradients of every rank in backward (gradients written straight into DDP's buckets; buffers are broadcast once
    per epoch, not at every forward)."""
    import models
    import wa
    mem = memory_format(device)
    model = models.get_model(args.arch, ds["num_classes"], ds["channels"])
    if args.sync_bn and world > 1:
        model = sync_batchnorm(model, device)
    model = model.to(device, memory_format=mem)
    net = torch.compile(model) if args.compile else model
    if world > 1:
        # Buffers are broadcast once per epoch (end_epoch), not before every forward: the per-step attack forwards
        # would otherwise each broadcast them.
        no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        net = torch.nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True, **no_sync_buffers)
        # Gradients live in DDP's buckets from the first backward on and are zeroed, not freed, between steps
        # (zero_grad(set_to_none=False)): every backward accumulates in place into the bucket. A freshly allocated
        # gradient that sums two forwards' contributions (SAR, TRADES, MART, ISEAT) may get other strides than its
        # parameter where a dimension has size 1 (the first conv of a grey-image network, 16 x 1 x 3 x 3): DDP then
        # warned ("Grad strides do not match bucket view strides") and copied the gradient at every step.
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    avg = wa.averaged(model, args.wa_mode, args.wa_decay, args.wa_warmup) if args.wa else None
    return model, net, opt, avg


def set_lr(opt, args, t):
    """Piecewise-constant lr: args.lr x 0.1 for every milestone m <= t, t the (fractional) number of epochs done.
    Called with t = epoch (0-based) at the start of an epoch, the lr decays for the first time in epoch m + 1
    (1-based). Returns the lr."""
    lr = args.lr * 0.1 ** sum(t >= m for m in args.milestones)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def train_batches(ds, args, epoch, rank, world, noise=None):
    """One epoch of training batches: (x, y, noise, gather). Order, crops, flips and `noise` (see data.batches) are
    drawn for the global batch from (seed, epoch) and each rank takes its share, so a resumed run repeats the epoch
    and N processes see the data of one. `gather` (None in one process) concatenates a per-rank tensor over the
    global batch, in its order, with autograd: what a method defines over the batch is computed over the global
    batch. Shows a progress line on a terminal (rank 0)."""
    import data
    epoch_seed = args.seed * 100_003 + epoch
    torch.manual_seed(epoch_seed)  # any other randomness of the step
    n = len(ds["train_x"])
    nb = data.num_batches(n, args.batch_size, args.max_batches)
    mem = memory_format(ds["train_x"].device)
    t0 = time.time()
    for i, (x, y, z) in enumerate(data.batches(ds["train_x"], ds["train_y"], args.batch_size, shuffle=True,
                                               augment=ds["augment"], seed=epoch_seed, rank=rank, world=world,
                                               max_batches=args.max_batches, memory_format=mem, noise=noise)):
        gather = gatherer(data.shard_sizes(min(args.batch_size, n - i * args.batch_size), world)) if world > 1 \
            else None
        yield x, y, z, gather
        if rank == 0:
            progress(i + 1, nb, t0, f"epoch {epoch + 1}")


def start_epoch(device):
    """Zeroed per-epoch sums, kept on the device (no host sync in the loop), and the epoch's start time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return dict(loss=torch.zeros((), device=device), correct=torch.zeros((), device=device),
                seen=torch.zeros((), device=device)), time.time()


def tally(sums, y, loss, logits, **terms):
    """Adds one batch to the epoch's sums: loss, correct predictions, images, and the method's own terms."""
    n = len(y)
    sums["loss"] += loss.detach() * n
    sums["correct"] += (logits.detach().argmax(1) == y).sum()
    sums["seen"] += n
    for k, v in terms.items():
        sums[k] = sums.get(k, 0) + v.detach() * n


def end_epoch(args, method, epoch, ds, model, avg, opt, best, sums, t0, lr, **log):
    """Everything after an epoch's batches, the same for every method:
      - the epoch's sums over all ranks (the one host sync of the epoch);
      - weight averaging: the SWA update from the first milestone on, with its BatchNorm recomputation;
      - rank 0's BatchNorm statistics to every rank (without --sync-bn they drift apart within an epoch);
      - on rank 0: validation of the model (and the average) on the held-out split, one log line, and the
        checkpoints, each written atomically: best.pt / wa_best.pt when validation improved, then last.pt.
    `log` adds the method's own entries to the log line (None: left out). Returns the new [best, wa_best]."""
    import wa
    keys = sorted(sums)
    totals = dict(zip(keys, reduce_sum(*(sums[k] for k in keys), device=sums["loss"].device)))
    train_time = time.time() - t0
    mem = memory_format(ds["train_x"].device)
    wa_start = args.milestones[0] if args.milestones else 0
    wa_ready = wa.after_epoch(avg, model, args.wa_mode, epoch, wa_start, bn_batches(ds, args, mem, model))
    broadcast_buffers(model, avg.module if avg is not None else None)
    if dist.is_initialized() and dist.get_rank() != 0:
        return best
    seen = totals.pop("seen")
    val_clean, val_pgd = validate(model, ds, args.eps, args.alpha, args.val_steps)
    wa_clean, wa_pgd = validate(avg.module, ds, args.eps, args.alpha, args.val_steps) if wa_ready else (None, None)
    terms = {f"train_{k}": v / seen for k, v in totals.items() if k not in ("loss", "correct")}
    extra = {**log, **terms}  # log: the method's entries (lam, ...) and its terms' defaults while off (None)
    rec = tidy(dict(epoch=epoch + 1, lr=lr, **{k: v for k, v in extra.items() if not k.startswith("train_")},
                    train_loss=totals["loss"] / seen, train_acc=100 * totals["correct"] / seen,
                    **{k: v for k, v in extra.items() if k.startswith("train_")},
                    val_clean=val_clean, val_pgd=val_pgd, wa_val_clean=wa_clean, wa_val_pgd=wa_pgd,
                    time=time.time() - t0, train_time=train_time, img_per_s=seen / train_time))
    log_epoch(args.out, rec)
    info = meta(args, method, ds, epoch + 1, rec)
    return list(save_epoch(args, info, model, opt, avg, *best))


def finish(args, method, model, ds, world, passes):
    """The end of a run: --bench prints its throughput line and removes its folder; a training run says what it
    left (best.pt's epoch and validation numbers, the files) and the evaluation to run next. passes: forward-
    equivalents per image of the method's step (for --bench's TFLOP/s)."""
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    if args.bench:
        if main_rank:
            import bench  # --bench's report lives with the speed table
            bench.report_line(args, model, ds, read_log(args.out)[-1], world, passes)
        shutil.rmtree(args.out, ignore_errors=True)
    elif main_rank:
        best_path = os.path.join(args.out, "best.pt")
        if os.path.exists(best_path):
            m = load_checkpoint(best_path)["metrics"]
            val = f"validation clean {m['val_clean']:.2f} %" + (
                f", PGD-{args.val_steps} {m['val_pgd']:.2f} %" if m.get("val_pgd") is not None else "")
            eps = f" --eps {attacks.radius(args.eps)}" if args.eps > 0 and abs(args.eps - 8 / 255) > 1e-9 else ""
            print(f"done: {method}.py, {args.epochs} epoch{'s' if args.epochs != 1 else ''}; best.pt holds epoch {m['epoch']} ({val}); files in "
                  f"{args.out} (last.pt, best.pt{', wa_best.pt' if os.path.exists(os.path.join(args.out, 'wa_best.pt')) else ''}, log.jsonl). "
                  f"Next: python eval.py {best_path}{eps}", flush=True)
        else:
            print(f"done: {method}.py, {args.epochs} epoch{'s' if args.epochs != 1 else ''}; no best.pt (--val-size 0); files in {args.out} "
                  f"(last.pt, log.jsonl). Next: python eval.py {os.path.join(args.out, 'last.pt')}", flush=True)
    distributed_cleanup()


def read_log(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- several processes (torchrun): one process per
# GPU, or per CPU process with the gloo backend

def distributed_setup(device, timeout=600.0):
    """Under torchrun (WORLD_SIZE > 1) joins the process group and picks this rank's GPU. A collective that waits
    longer than `timeout` seconds for the other processes fails (see cli: one line, then torchrun can restart the
    group). Returns (device, rank, world)."""
    import datetime
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)  # checked with the other flags (check_train_args)
    if world == 1:
        return device, 0, 1
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torchrun's store outlives a restart of the group (--max-restarts): the keys of each attempt get a prefix
        # of their own, else a restarted process can read the address of a dead one and fail to connect
        timeout = datetime.timedelta(seconds=timeout)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world, timeout=timeout)
    return device, rank, world


def gatherer(sizes):
    """gather(t): the concatenation over ranks of t (this rank's share of a global batch, sizes[r] rows on rank r),
    in the global batch's order, with autograd. Its backward sums every rank's gradient for this rank's rows: when
    each rank computes the same global term from the gathered tensor, rank r gets N times its rows' gradient, and
    DDP's averaging over the N ranks leaves exactly the one-process gradient."""
    from torch.distributed.nn.functional import all_gather
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


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch (torch's SyncBatchNorm, which takes
    only GPU tensors, for gloo/CPU processes): the per-rank sums are all-reduced with autograd, so the gradient is
    the one-process gradient once DDP has averaged it. Same parameters, buffers and running-statistics update as
    BatchNorm2d."""

    def forward(self, x):
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


def sync_batchnorm(model, device):
    """--sync-bn: every BatchNorm2d computes its training statistics over the global batch (SyncBatchNorm on GPUs,
    GlobalBatchNorm2d on CPU processes)."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            ref = child.running_mean if child.running_mean is not None else child.weight
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=ref.device, dtype=ref.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def distributed_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def reduce_sum(*values, device="cpu"):
    """Sums numbers or 0-d tensors over all ranks (once per epoch); returns Python floats."""
    t = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float64) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(*modules):
    """Rank 0's buffers (BatchNorm statistics) to every rank, so all ranks hold one model."""
    if dist.is_initialized():
        for m in modules:
            if m is not None:
                for b in m.buffers():
                    dist.broadcast(b, 0)
