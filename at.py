"""PGD adversarial training (PGD-AT), the baseline every other method is compared with.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018,
with the recipe of Rice, Wong, Kolter, "Overfitting in adversarially robust deep learning", ICML 2020:

    min_theta  E_(x,y) [ max_{||x' - x||_inf <= eps}  CE(f_theta(x'), y) ]

the inner max approximated by PGD-10 (eps 8/255, step 2/255, random start) with the network in train mode.
PreActResNet-18, SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 200 epochs; the best checkpoint is chosen by
PGD-10 accuracy on a held-out split of the training set (Rice et al.'s early stopping against robust overfitting).
As Rice et al.'s released script (train_cifar.py), the lr is set before every step from t = epoch + (i + 1) / batches
(0-based epoch, batch i): x0.1 once t reaches 100 and again at 150, so the last step of epochs 100 and 150 (1-based)
already runs at the lower lr. Rice et al.'s CIFAR-100 script also rotates the training images by up to 15 degrees:
--rotate 15. --eps 0 is natural training (no attack; best.pt is then chosen on clean accuracy).

    python at.py                                   # PreActResNet-18, CIFAR-10, the paper's setting
    python at.py --dataset cifar100 --wa --amp     # + EMA weight averaging, bf16 autocast
    torchrun --nproc_per_node=4 at.py --amp        # data-parallel on 4 GPUs, global batch still 128
    python at.py --bench --arch wrn34_10 --amp     # images/s of this configuration, in a minute

The file is the whole program: the method (at_objective), its flags, then the run. The run code marked "shared run
code" is the same in every method file (a test keeps the copies identical), so `diff at.py sar.py` shows the method.
"""
import argparse
import datetime
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

import attacks
import data
import models
import wa
from attacks import pgd

METHOD = "at"
TERM = None  # the method's own loss term, logged as train_TERM (PGD-AT has none)


def at_objective(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, noise=None, norm="Linf"):
    """PGD-AT's loss on one batch: x' = PGD-`steps` from a random start in the eps-ball, with the network in the mode
    the caller left it in (train mode, as Rice et al.); then CE(f(x'), y). `noise`: the U(0, 1) draw of the random
    start (default: drawn here); norm "L2": the L2 ball (noise: a point of the unit ball). Returns (loss,
    adversarial logits); the caller owns zero_grad, backward and the optimiser step. eps 0 is natural training (no
    attack). Needs torch, torch.nn.functional as F and attacks.pgd (with cw_loss, which pgd names)."""
    x_adv = pgd(model, x, y, eps, alpha, steps, random_start=True, norm=norm, noise=noise) if eps > 0 else x
    logits = model(x_adv)
    return F.cross_entropy(logits.float(), y), logits


def get_args(argv=None):
    p = argparse.ArgumentParser(description="PGD adversarial training (Madry et al. 2018; Rice et al. 2020 recipe)")
    # ---- shared run code: the flags ----
    p.add_argument("--dataset", default="cifar10", help=", ".join(data.DATASETS))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--arch", default="preact_resnet18", help=", ".join(models.ARCHS))
    p.add_argument("--epochs", type=int)
    p.add_argument("--milestones", type=int, nargs="*", help="lr x0.1 after each of these epochs")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split across torchrun processes")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="threat model of training and validation")
    p.add_argument("--eps", type=attacks.fraction, default=None,
                   help="radius (8/255 or a number; default 8/255 for Linf, 128/255 for L2 as Rice et al.; 0: natural)")
    p.add_argument("--alpha", type=attacks.fraction, default=None,
                   help="step of the training PGD (default 2/255 for Linf, 15/255 for L2 as Rice et al.)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    p.add_argument("--val-steps", type=int, help="PGD steps of validation")
    p.add_argument("--val-size", type=int, help="held-out training images for choosing best.pt")
    p.add_argument("--pad-mode", default="zero", choices=["zero", "reflect"], help="padding of the random crop")
    p.add_argument("--rotate", type=float, default=0.0, help="random rotation, max degrees (Rice's CIFAR-100: 15)")
    p.add_argument("--extra-data", default=None, metavar="FILE",
                   help="extra training images: Carmon et al.'s 500K .pickle or a generated-image .npz")
    p.add_argument("--extra-fraction", type=float, default=None,
                   help="each batch of --batch-size holds int(f B) extra images (Gowal/Rebuffi/Wang: 0.7); default: "
                        "B labelled + B extra (ISEAT's --rst)")
    p.add_argument("--extra-on", default="auto", choices=["auto", "device", "host"],
                   help="where the extra set lives (auto: the device if it fits in a quarter of its free memory)")
    p.add_argument("--augment", default="crop-flip", choices=["crop-flip", *data.IDBH_VARIANTS],
                   help="crop-flip: pad, crop and flip; idbh-*: the IDBH variants of Li and Spratling (see data.py)")
    p.add_argument("--wa", action="store_true", help="keep a weight average (see wa.py) and validate it too")
    p.add_argument("--wa-mode", default="ema", choices=["ema", "swa"])
    p.add_argument("--wa-decay", type=float, default=0.999)
    p.add_argument("--wa-warmup", action="store_true", help="EMA decay min(d, (1+t)/(10+t))")
    p.add_argument("--wa-bn", default="clean", choices=["clean", "adversarial"],
                   help="images of SWA's BatchNorm recomputation (adversarial: PGD examples, for PGD-AT)")
    p.add_argument("--out", default=None, help=f"output folder (default runs/{METHOD}-DATASET-ARCH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (evaluation stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training and attacks")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--bench", action="store_true",
                   help="measure images/s: 2 epochs of --max-batches (20) batches, no validation, nothing kept")
    p.add_argument("--sync-bn", action="store_true",
                   help="torchrun on GPUs: BatchNorm statistics over the global batch (default: each process's own)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="torchrun: seconds a process waits for the others before it gives up")
    # ---- end shared ----
    p.set_defaults(epochs=200, milestones=[100, 150], val_steps=10, val_size=1000)  # Rice et al.'s recipe
    return parse(p, argv)


def main(argv=None):
    args = get_args(argv)
    train = attacks.describe("pgd", args.eps, args.steps, args.alpha, args.norm) if args.eps > 0 else \
        "natural training (no attack)"
    # --bench's forward-equivalents per image: PGD steps 2 each (forward + input gradient), the training pass 3
    passes = 2 * args.steps * (args.eps > 0) + 3
    # ---- shared run code: set-up ----
    # torchrun starts one process per GPU (gloo: per CPU process); each runs this file and takes its share of every
    # global batch. Under torchrun --max-restarts its store outlives a restart of the group: each attempt's keys get
    # a prefix of their own, else a restarted process can read a dead one's address and fail to connect.
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device, main_rank = torch.device(args.device), rank == 0
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=args.timeout)
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/",
                                 next(dist.rendezvous("env://", timeout=timeout))[0])
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world, timeout=timeout)
    require(args.batch_size >= world, f"--batch-size {args.batch_size} is smaller than the {world} processes")
    ck = check_out(args, main_rank)  # the last.pt to resume, or None; OUT is checked before any data is read
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights
    torch.backends.cudnn.benchmark = True
    mem = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # faster convs under autocast
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate,
                   idbh=None if args.augment == "crop-flip" else args.augment)
    n_train = len(ds["train_x"])
    # extra images: B extra joined to every batch of B (ISEAT's --rst), or a fraction f of every batch of B; an epoch
    # is ceil(labelled images / B) batches either way. Validation and test never see them.
    extra = data.attach_extra(args.extra_data, ds, device, args.extra_on, args.data_dir) if args.extra_data else None
    b_extra = 0 if extra is None else args.batch_size if args.extra_fraction is None else \
        int(args.extra_fraction * args.batch_size)  # int(), as the authors' sampler
    b_lab = args.batch_size - (b_extra if args.extra_fraction is not None else 0)  # labelled images per batch
    nb = data.num_batches(n_train, args.batch_size, args.max_batches)
    seen = sum(min(b_lab, n_train - i * b_lab) + b_extra for i in range(nb))  # images an epoch trains on
    if main_rank:
        os.makedirs(args.out, exist_ok=True)  # made only now: a run that cannot start leaves no folder
    # model: the weights (optimised, averaged, validated, saved); net: the same network as the step calls it
    model = models.get_model(args.arch, ds["num_classes"], ds["channels"])
    if args.sync_bn and world > 1:  # BatchNorm statistics over the global batch
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        require(device.type == "cuda" or not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
                "--sync-bn: nn.SyncBatchNorm runs on GPUs only; leave it out for CPU processes")
    model = model.to(device, memory_format=mem)
    net = torch.compile(model) if args.compile else model
    if world > 1:
        # DDP averages the gradients of all ranks in backward. Buffers are broadcast once per epoch (below), not
        # before every forward (the attack's forwards would each do it). Gradients live in DDP's buckets from the
        # start and are zeroed, not freed (zero_grad(set_to_none=False)): a gradient freshly allocated by a backward
        # through two forwards (SAR, TRADES, MART, ISEAT) can get other strides than its parameter (a 16x1x3x3
        # conv), and DDP would then copy it at every step.
        net = torch.nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True, broadcast_buffers=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    avg = wa.averaged(model, args.wa_mode, args.wa_decay, args.wa_warmup) if args.wa else None
    wa_start = args.milestones[0] if args.milestones else 0  # SWA averages from the first lr decay on
    start, best, wa_best = 0, -1.0, -1.0
    if ck is not None:
        last = os.path.join(args.out, "last.pt")
        models.load_weights(model, ck["model"], last, args.arch)
        opt.load_state_dict(ck["optimizer"])
        if avg is not None and ck["wa_model"] is not None:
            models.load_weights(avg.module, ck["wa_model"], last + " (wa_model)", args.arch)
            avg.n_averaged.fill_(ck["wa_n"])
        start, best, wa_best = ck["epoch"], ck["best"], ck["wa_best"]
        if main_rank:
            print(f"resumed {last} at epoch {start}" + ("" if start < args.epochs else
                                                        f"; nothing left to train with --epochs {args.epochs}"))
    if main_rank:
        wa_text = "off" if not args.wa else (
            f"swa (equal average of the end-of-epoch weights from epoch {wa_start + 1}, the first after an lr decay; "
            f"BatchNorm recomputed on {args.wa_bn} images)" if args.wa_mode == "swa" else
            f"ema (decay {args.wa_decay:g} after every step{', warmed up' if args.wa_warmup else ''})")
        print(f"{METHOD}.py: {args.arch} on {args.dataset} ({n_train} train / {len(ds['val_x'])} val), {device} x "
              f"{world}, train {train}, validation {'clean' if args.eps == 0 else f'clean + PGD-{args.val_steps}'}, "
              f"amp={args.amp}, compile={args.compile}, wa={wa_text}" + ("" if extra is None else
              f", extra images: {len(extra['y'])} from {args.extra_data} ({b_lab} labelled + {b_extra} extra a "
              f"batch, {'memory-mapped on the host' if extra['host'] else 'on the device'})"), flush=True)
    # ---- end shared ----

    for epoch in range(start, args.epochs):
        # ---- shared run code: the epoch's start ----
        net.train()
        lr = lr_at(args, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        # the epoch's order, crops, flips and attack starts come from (seed, epoch), drawn for the global batch:
        # a resumed run repeats the epoch exactly, and N processes see the data of one
        epoch_seed = args.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)  # any other randomness of the step
        tally = torch.zeros(3, device=device)  # loss, correct, the method's term: summed on the device, read once
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        # ---- end shared ----
        for i, (x, y, noise) in enumerate(data.batches(
                ds["train_x"], ds["train_y"], b_lab, shuffle=True, augment=ds["augment"], seed=epoch_seed, rank=rank,
                world=world, max_batches=nb, memory_format=mem, extra=extra, extra_per_batch=b_extra,
                noise="uniform" if args.norm == "Linf" else "ball")):
            for g in opt.param_groups:  # Rice et al.: the lr of t = epoch + (i + 1) / batches, set before every step
                g["lr"] = lr_at(args, epoch + (i + 1) / nb)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss, logits = at_objective(net, x, y, args.eps, args.alpha, args.steps, noise, args.norm)
            opt.zero_grad(set_to_none=False)  # the attack took input gradients only: nothing stale to clear
            loss.backward()
            opt.step()
            if avg is not None and args.wa_mode == "ema":  # EMA: after every optimiser step
                avg.update_parameters(model)
            tally[0] += loss.detach().float() * len(y)
            tally[1] += (logits.detach().argmax(1) == y).sum()
        log = {}  # the method's own entries of the log line

        # ---- shared run code: the end of the epoch ----
        if world > 1:
            dist.all_reduce(tally)  # the sums over all processes
        loss_sum, correct, term_sum = tally.tolist()  # the epoch's one host sync
        train_time = time.time() - t0
        if avg is not None and args.wa_mode == "swa" and epoch >= wa_start:  # SWA: the end-of-epoch weights
            avg.update_parameters(model)
            with torch.no_grad():  # then its BatchNorm statistics, from a pass over training images
                update_bn(wa.bn_batches(ds, args, model, seen, mem, world), avg.module)
        if world > 1:  # rank 0's BatchNorm statistics to every rank (without --sync-bn they drift apart)
            for b in [*model.buffers(), *(avg.module.buffers() if avg is not None else [])]:
                dist.broadcast(b, 0)
        if main_rank:  # validation, the log line, the checkpoints
            wa_ready = avg is not None and int(avg.n_averaged) > 0
            val_clean, val_pgd = validate(model, ds, args)
            wa_clean, wa_pgd = validate(avg.module, ds, args) if wa_ready else (None, None)
            if TERM:
                log[f"train_{TERM}"] = term_sum / seen if term_on else None
            rec = dict(epoch=epoch + 1, lr=lr, **log, train_loss=loss_sum / seen, train_acc=100 * correct / seen,
                       val_clean=val_clean, val_pgd=val_pgd, wa_val_clean=wa_clean, wa_val_pgd=wa_pgd,
                       time=time.time() - t0, train_time=train_time, img_per_s=seen / train_time)
            rec = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in rec.items()}  # no float noise
            units = dict(time=" s", train_time=" s", img_per_s=" img/s")
            print(" | ".join(f"{k} {v:.4g}{units.get(k, ' %' if k.endswith(('_acc', '_clean', '_pgd')) else '')}"
                             if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if v is not None),
                  flush=True)
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
            # best.pt: the highest validation PGD accuracy (Rice et al.), clean accuracy for natural training; each
            # checkpoint written atomically. A weight average that holds no weights yet is saved as None.
            save = models.save_checkpoint
            info = dict(format=models.CKPT_FORMAT, method=METHOD, arch=args.arch, dataset=args.dataset,
                        num_classes=ds["num_classes"], in_channels=ds["channels"], epoch=epoch + 1, args=vars(args),
                        metrics=rec)
            score = val_pgd if val_pgd is not None else val_clean
            if score is not None and score > best:
                best = score
                save(dict(info, model=model.state_dict()), os.path.join(args.out, "best.pt"))
            wa_score = wa_pgd if wa_pgd is not None else wa_clean
            if wa_score is not None and wa_score > wa_best:
                wa_best = wa_score
                save(dict(info, model=avg.module.state_dict(), weights="wa", wa_n=int(avg.n_averaged)),
                     os.path.join(args.out, "wa_best.pt"))
            save(dict(info, model=model.state_dict(), optimizer=opt.state_dict(), best=best, wa_best=wa_best,
                      wa_model=avg.module.state_dict() if wa_ready else None,
                      wa_n=int(avg.n_averaged) if wa_ready else 0), os.path.join(args.out, "last.pt"))
        # ---- end shared ----

    # ---- shared run code: the end of the run ----
    if main_rank and args.bench:  # images/s of the second epoch, and the TFLOP/s it implies
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model.eval()(ds["train_x"][:2].float() / 255)
        gflop = flops.get_total_flops() / 2 / 1e9
        print(f"benchmark: {rec['img_per_s']:.4g} images/s ({args.arch}, {args.dataset}, batch {args.batch_size}, "
              f"{world} process(es), amp={args.amp}, compile={args.compile}); forward {gflop:.3g} GFLOP/image x "
              f"{passes} forward-equivalents = {rec['img_per_s'] * gflop * passes / 1000:.3g} TFLOP/s achieved",
              flush=True)
    if args.bench:
        shutil.rmtree(args.out, ignore_errors=True)
    elif main_rank:
        best_path = os.path.join(args.out, "best.pt")
        done = f"done: {METHOD}.py, {args.epochs} epoch{'s' if args.epochs != 1 else ''}; "
        if os.path.exists(best_path):
            m = models.load_checkpoint(best_path)["metrics"]
            val = f"validation clean {m['val_clean']:.2f} %" + (
                f", PGD-{args.val_steps} {m['val_pgd']:.2f} %" if m.get("val_pgd") is not None else "")
            usual = (8 / 255,) if args.norm == "Linf" else (0.5, 128 / 255)  # eval.py's radius: 8/255 or 0.5
            unusual = args.eps > 0 and min(abs(args.eps - u) for u in usual) > 1e-9
            eps = f" --eps {attacks.radius(args.eps, args.norm)}" if unusual else ""
            wa_file = ", wa_best.pt" if os.path.exists(os.path.join(args.out, "wa_best.pt")) else ""
            print(f"{done}best.pt holds epoch {m['epoch']} ({val}); files in {args.out} (last.pt, best.pt{wa_file}, "
                  f"log.jsonl). Next: python eval.py {best_path}{eps}", flush=True)
        else:
            print(f"{done}no best.pt (--val-size 0); files in {args.out} (last.pt, log.jsonl). "
                  f"Next: python eval.py {os.path.join(args.out, 'last.pt')}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model, avg
    # ---- end shared ----


# ---- shared run code: helpers ----
def require(ok, message):
    """Bad input ends in one line naming the problem and the fix."""
    if not ok:
        raise SystemExit(f"error: {message}")


def lr_at(args, t):
    """The piecewise-constant lr after t epochs (0-based, fractional): --lr x0.1 for every milestone m <= t. At the
    start of epoch e (t = e) it has decayed for the first time in epoch m + 1 (1-based)."""
    return args.lr * 0.1 ** sum(t >= m for m in args.milestones)


def parse(p, argv):
    """The flags, checked before any work: every problem is one line. Negative numbers (-8/255) are read as values,
    so that the range checks can name them. --bench: 2 epochs of --max-batches (20), no validation, nothing kept."""
    def error(message):
        raise SystemExit(f"error: {message} (--help lists the flags)")
    p.error = error
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(/[\d.]+)?$")
    a = p.parse_args(argv)
    a.out = a.out or os.path.join("runs", f"{METHOD}-{a.dataset}-{a.arch}")
    linf = a.norm == "Linf"
    a.eps = (8 / 255 if linf else 128 / 255) if a.eps is None else a.eps
    a.alpha = (2 / 255 if linf else 15 / 255) if a.alpha is None else a.alpha
    r = lambda v: attacks.radius(v, digits=6)  # noqa: E731 (a radius as the user wrote it)
    for ok, message in (
            (a.dataset in data.DATASETS, f"unknown dataset {a.dataset!r}; choose one of {', '.join(data.DATASETS)}"),
            (a.arch in models.ARCHS, f"unknown arch {a.arch!r}; choose one of {', '.join(models.ARCHS)}"),
            (a.epochs >= 1, f"--epochs {a.epochs}: train at least 1 epoch"),
            (a.batch_size >= 1, f"--batch-size {a.batch_size}: use a positive batch size, e.g. 128"),
            (a.max_batches is None or a.max_batches >= 1, f"--max-batches {a.max_batches}: use a positive number of "
                                                          f"batches, or leave it out for whole epochs"),
            (0 <= a.eps <= (1 if linf else math.inf), f"--eps {r(a.eps)}: radii are in [0,1] pixel units (8/255, not "
                                                        f"8); use 0 .. 1"),
            (0 < a.alpha <= (1 if linf else math.inf), f"--alpha {r(a.alpha)}: the step is in [0,1] pixel units "
                                                       f"(2/255, not 2)"),
            (a.steps >= 1 or a.steps == 0 == a.eps, f"--steps {a.steps} with --eps {r(a.eps)}: give the attack steps, "
                                                    f"or --eps 0 for natural training"),
            (a.val_steps >= 1, f"--val-steps {a.val_steps}: validation PGD needs at least 1 step"),
            (a.val_size >= 0, f"--val-size {a.val_size}: use 0 (no validation) or more held-out images"),
            (a.lr > 0, f"--lr {a.lr:g}: use a positive learning rate"),
            (0 <= a.momentum < 1, f"--momentum {a.momentum:g}: use 0 <= momentum < 1"),
            (a.wd >= 0, f"--wd {a.wd:g}: use a weight decay >= 0"),
            (all(m >= 1 for m in a.milestones) and a.milestones == sorted(set(a.milestones)),
             f"--milestones {' '.join(map(str, a.milestones))}: give increasing epochs >= 1"),
            (a.timeout > 0, f"--timeout {a.timeout:g}: use a positive number of seconds"),
            (0 < a.wa_decay < 1, f"--wa-decay {a.wa_decay:g}: use a decay in (0, 1), e.g. 0.999"),
            (0 <= a.rotate <= 180, f"--rotate {a.rotate:g}: use 0 .. 180 degrees"),
            (a.seed >= 0, f"--seed {a.seed}: use a seed >= 0"),
            (a.extra_fraction is None or (a.extra_data and 0 < a.extra_fraction < 1),
             f"--extra-fraction {a.extra_fraction}: give a fraction in (0, 1) of each batch, with --extra-data")):
        require(ok, message)
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise SystemExit(f"error: --device {a.device!r} is not a device; use cpu, cuda or cuda:N") from None
    require(device.type != "cuda" or torch.cuda.is_available(),
            f"--device {a.device}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
    require(device.type != "cuda" or device.index is None or device.index < torch.cuda.device_count(),
            f"--device {a.device}: only {torch.cuda.device_count()} GPU(s) are visible")
    late = [m for m in a.milestones if m >= a.epochs]
    given = any(s.startswith("--milestones") for s in (sys.argv[1:] if argv is None else argv))
    require(not (late and given), f"--milestones {' '.join(map(str, a.milestones))}: the lr decays after these epochs, "
                                  f"so each must be below --epochs {a.epochs}; drop {' '.join(map(str, late))} or "
                                  f"train longer")
    if late and not a.bench and os.environ.get("RANK", "0") == "0":
        print(f"note: --epochs {a.epochs} ends before the lr decays at {' '.join(map(str, late))} (the default "
              f"--milestones); pass --milestones to decay within the run")
    if a.bench:
        a.epochs, a.max_batches, a.val_size = 2, a.max_batches or 20, 0
        a.out, a.resume = tempfile.mkdtemp(prefix="bench-"), False
    return a


def check_out(args, main_rank):
    """The output folder, before any work: writable; never clobbered (an existing run is only continued, with
    --resume, by the same method, network, data set and --wa); cleared of temp files of killed writes and of the
    log lines of a run that died before its first last.pt. Returns the last.pt to resume, or None."""
    top = os.path.abspath(args.out)
    while not os.path.exists(top):
        top = os.path.dirname(top)
    require(os.path.isdir(top) and os.access(top, os.W_OK), f"cannot write to {args.out} "
            f"({'Permission denied' if os.path.isdir(top) else 'Not a directory'}); pass --out to a writable folder")
    for tmp in glob.glob(os.path.join(glob.escape(args.out), "*.tmp*")) if main_rank else []:
        pid = tmp.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and os.path.isdir("/proc") and not os.path.exists(f"/proc/{pid}"):
            os.remove(tmp)
            print(f"removed {os.path.basename(tmp)}: the temp file of a write that was killed")
    last, log = os.path.join(args.out, "last.pt"), os.path.join(args.out, "log.jsonl")
    if not os.path.exists(last):
        if main_rank and args.resume:
            print(f"--resume: nothing to resume in {args.out} (no last.pt); starting a new run")
        if main_rank and os.path.exists(log):
            n = sum(1 for line in open(log) if line.strip())
            os.remove(log)
            print(f"removed {n} log line(s) of an earlier run in {args.out} that ended before writing last.pt")
        return None
    require(args.resume, f"{args.out} already holds a run (last.pt); pass --resume to continue it or --out for a new "
                         f"one")
    ck = models.load_checkpoint(last)
    require(isinstance(ck, dict) and ck.get("format") == models.CKPT_FORMAT and "optimizer" in ck,
            f"{last} is not a last.pt written by this project; pass --out for a new run")
    m = ck["method"]
    require((m, ck["arch"], ck["dataset"]) == (METHOD, args.arch, args.dataset),
            f"{last} holds {'an' if m[0] in 'aeiou' else 'a'} {m}.py run of {ck['arch']} on {ck['dataset']}; resume it "
            f"with python {m}.py --arch {ck['arch']} --dataset {ck['dataset']}, or pass --out for a new run")
    saved = ck["args"]
    wa_text = f"--wa --wa-mode {saved['wa_mode']}" if saved["wa"] else "no --wa"
    require(saved["wa"] == args.wa and (not args.wa or saved["wa_mode"] == args.wa_mode),
            f"{last} was trained with {wa_text}; resume it with the same (changing it would drop or restart the "
            f"weight average), or pass --out for a new run")
    if main_rank and os.path.exists(log):  # log lines of epochs that will run again (a run killed after logging)
        keep = [line for line in open(log) if line.strip() and json.loads(line)["epoch"] <= ck["epoch"]]
        with open(log, "w") as f:
            f.writelines(keep)
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in sorted(vars(args).items())
               if k in saved and saved[k] != v and k != "resume"]
    if main_rank and changed:
        print("resuming with changed flags: " + ", ".join(changed))
    return ck


def validate(model, ds, args):
    """Clean and PGD-(--val-steps) accuracy (%) on the held-out split, in the training attack's norm, radius and
    step: the model frozen in eval mode, fp32, random start. PGD is None for natural training (no attack to report)."""
    if len(ds["val_x"]) == 0:
        return None, None
    clean = 100 * attacks.correct(model, ds["val_x"], ds["val_y"]).float().mean().item()
    if args.eps == 0:
        return clean, None
    return clean, 100 * attacks.correct(model, ds["val_x"], ds["val_y"], attack=attacks.pgd, eps=args.eps,
                                        alpha=args.alpha, steps=args.val_steps, norm=args.norm).float().mean().item()


def cli(argv=None):
    """The command line. Errors are one line, printed once under torchrun (every rank runs the same checks). A
    process that lost the others (a peer killed, a node gone) ends with one line after at most --timeout seconds,
    so that torchrun --max-restarts can restart the group, which then continues from last.pt (--resume)."""
    try:
        return main(argv)
    except SystemExit as e:
        if isinstance(e.code, str) and os.environ.get("RANK", "0") != "0":
            raise SystemExit(1) from None
        raise
    except RuntimeError as e:  # a collective that failed: gloo's and NCCL's errors are RuntimeErrors
        text = str(e)
        if "WORLD_SIZE" not in os.environ or not (isinstance(e, getattr(dist, "DistError", ())) or any(
                w in text for w in ("gloo", "NCCL", "Connection", "timed out", "Timed out", "closed by peer"))):
            raise
        raise SystemExit(f"error: rank {os.environ.get('RANK', '?')} lost contact with the other processes "
                         f"({(text.strip().splitlines() or [type(e).__name__])[0][:160]}); run under torchrun "
                         f"--max-restarts N with --resume to continue from last.pt") from None


if __name__ == "__main__":
    cli()
# ---- end shared ----
