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
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile

import torch
import torch.distributed as dist

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
    prints it (all ranks run the same checks)."""
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str) and int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(1) from None
        raise


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


def start_run(args, method, main_rank):
    """Prepares args.out before the work starts and says what happens to what is there. Returns the state of
    OUT/last.pt to resume from, or None for a fresh start.
      - OUT must be writable (checked now, not after the first epoch);
      - temp files of writes that were killed are removed;
      - an existing run is only continued with --resume, and only by the same method, arch and data set;
      - a weight average is never dropped or restarted silently: the --wa setting must match the checkpoint's;
      - a fresh start in a folder without last.pt does not inherit a dead run's log lines."""
    if main_rank:
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
            f"{last_path} holds a {ck['method']}.py run of {ck['arch']} on {ck['dataset']}; resume it with "
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


def resume(ck, args, model, opt, sched, avg, main_rank):
    """Loads the last.pt that start_run returned (if any) into the run's objects and drops log lines of epochs that
    will be run again. Returns (first epoch to run, best, wa_best)."""
    if ck is None:
        return 0, -1.0, -1.0
    path = os.path.join(args.out, "last.pt")
    load_weights(model, ck["model"], path, ck["arch"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if avg is not None and ck.get("wa_model") is not None:
        load_weights(avg.module, ck["wa_model"], path + " (wa_model)", ck["arch"])
        avg.n_averaged.fill_(ck["wa_n"])
    if main_rank:
        trim_log(args.out, ck["epoch"])
        left = "" if ck["epoch"] < args.epochs else f"; nothing left to train with --epochs {args.epochs}"
        print(f"resumed {path} at epoch {ck['epoch']}{left}")
    return ck["epoch"], ck["best"], ck["wa_best"]


def meta(args, method, ds, epoch, rec):
    """What every checkpoint carries besides its weights."""
    return dict(format=CKPT_FORMAT, method=method, arch=args.arch, dataset=args.dataset,
                num_classes=ds["num_classes"], in_channels=ds["channels"], epoch=epoch, args=vars(args), metrics=rec)


def save_epoch(args, info, model, opt, sched, avg, best, wa_best):
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
    save_checkpoint(dict(info, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                         best=best, wa_best=wa_best, wa_model=avg.module.state_dict() if has_wa else None,
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

    def batches():
        t0 = time.time()
        for i, (x, y) in enumerate(data.batches(ds["train_x"], ds["train_y"], 512, shuffle=True,
                                                augment=ds["augment"], max_batches=nb, memory_format=memory_format)):
            if args.wa_bn == "adversarial" and args.eps > 0:
                with attacks.frozen(model), torch.enable_grad():  # the pass itself runs under no_grad
                    x = attacks.pgd(model, x, y, args.eps, args.alpha, args.steps, random_start=True)
            yield x, y
            progress(i + 1, nb, t0, "SWA: recomputing BatchNorm statistics,")
    return batches


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


def forward_gflops(model, x):
    """GFLOP of one forward per image (torch.utils.flop_counter: 2 per multiply-add in convolutions and matmuls).
    A training pass (forward + backward) costs about 3 of these, a PGD step (input gradient only) about 2."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / len(x) / 1e9


def bench_report(args, model, ds, rec, world, passes):
    """The --bench line: images/s of the second epoch, and the TFLOP/s it implies (forward FLOPs x passes)."""
    gflop = forward_gflops(model, ds["train_x"][:2].float() / 255)
    print(f"benchmark: {rec['img_per_s']:.4g} images/s ({args.arch}, {args.dataset}, batch {args.batch_size}, "
          f"{world} process(es), amp={args.amp}, compile={args.compile}); forward {gflop:.3g} GFLOP/image x "
          f"{passes} forward-equivalents = {rec['img_per_s'] * gflop * passes / 1000:.3g} TFLOP/s achieved",
          flush=True)


def progress(i, n, t0, prefix=""):
    """A self-overwriting progress line on a terminal; reads no GPU value, so it costs no host sync."""
    if sys.stderr.isatty() and (i % 10 == 0 or i == n):
        sys.stderr.write(f"\r{prefix} {i}/{n} batches, {time.time() - t0:.0f} s" + (" " * 8 + "\r" if i == n else ""))
        sys.stderr.flush()


# ---------------------------------------------------------------- several processes (torchrun): one process per
# GPU, or per CPU process with the gloo backend

def distributed_setup(device):
    """Under torchrun (WORLD_SIZE > 1) joins the process group and picks this rank's GPU.
    Returns (device, rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)  # checked with the other flags (check_train_args)
    if world == 1:
        return device, 0, 1
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


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
