"""SAR: PGD-AT + spectral alignment regularisation.

Spectral alignment regularisation, Huang, Lin, Tao and Wong (2023). The regulariser keeps the Fourier spectrum of an
adversarial batch's logits close to that of its clean batch:

    L = CE(Z', y) + lambda * mean | F(Z') - F(Z) |,     Z' = f(x'), Z = f(x),  x' = PGD-10(f, x, y)

F is the unnormalised 2-D DFT of the B x C logit matrix, the L1 taken over real and imaginary parts and averaged
over all 2*B*C numbers; lambda = 0.1. The DFT is linear, F(Z') - F(Z) = F(Z' - Z): one transform of the logit
difference gives the term. Choices that follow the authors' released code rather than the paper's text:
  - the DFT runs over both axes, batch and class (torch.fft.fft2 of the logit matrix); the per-sample DFT over the
    class axis alone is offered as --sar-fft class;
  - the PGD attack runs with the network in eval mode, training forwards in train mode; two separate forwards
    (BatchNorm sees each batch alone), gradients through both, no clean CE term;
  - --sar-start-epoch (default 0; the released code used 75, the first lr decay);
  - best.pt is chosen on validation PGD-20 (--val-steps 20), the released code's main criterion.
The batch axis makes the term depend on the batch size: each of the 2BC Fourier coefficients sums B x C logit
differences, so the mean |coefficient| grows about as sqrt(B) (measured on random logits: 4.2x the class-axis term at
B = 16, 6.0x at 32, 12.0x at 128, 17.0x at 256). Doubling --batch-size multiplies the term, and so the effective
lambda, by about 1.4; --sar-fft class has no batch axis and is about sqrt(B) times smaller (retune lambda for it).
The term is computed over the global batch under torchrun (the logits of every process are gathered), so it does not
depend on the number of processes.
Schedule of the paper: 100 epochs, lr x0.1 at 75 and 90, 5,000 validation images; the paper's network is
WRN-34-10 in the TRADES layout (--arch wrn34_10), PreActResNet-18 is the default here. SAR+WA uses --wa (SWA from
the first milestone).
--sar-lambda 0 is the SAR authors' own AT baseline (eval-mode attack, this schedule); with --wa it is their AT+SWA,
for which --wa-bn adversarial matters (its training forwards then see only adversarial batches: see wa.py).

    python sar.py                                  # CIFAR-10, the paper's schedule
    python sar.py --dataset cifar100 --wa          # SAR + WA
    python sar.py --arch wrn34_10 --wa             # the paper's network
    torchrun --nproc_per_node=4 sar.py --amp       # 4 GPUs; the DFT still runs over the global batch

Below: the method, its flags, main, the plumbing; the "shared run code" is every method file's (a test keeps it so).
"""
import argparse
import json
import os
import re
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attacks
import data
import models
import wa
from attacks import pgd, within

METHOD = "sar"
TERM = "sar"  # the spectral alignment term, logged as train_sar


def sar_loss(logits_adv, logits_clean, fft="batch_class"):
    """mean | view_as_real(F(Z' - Z)) |, F the unnormalised DFT of the B x C logits over both axes
    (fft="batch_class") or over the class axis per sample (fft="class"). Always float32, also under autocast.
    Gradients flow into both arguments. With the batch axis the term grows about as sqrt(B) (each coefficient sums
    B x C differences): doubling the batch multiplies the effective lambda by about 1.4, and "class" is about
    sqrt(B) times smaller (retune lambda for it)."""
    if fft not in ("batch_class", "class"):
        raise ValueError(f"fft={fft!r}: use 'batch_class' (the 2-D DFT) or 'class' (per sample)")
    with torch.autocast(logits_adv.device.type, enabled=False):
        diff = logits_adv.float() - logits_clean.float()
        spectrum = torch.fft.fft2(diff) if fft == "batch_class" else torch.fft.fft(diff, dim=1)
        return torch.view_as_real(spectrum).abs().mean()


def sar_objective(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, lam=0.1, fft="batch_class", noise=None,
                  gather=None, norm="Linf"):
    """SAR's loss on one batch, as the authors' released code: x' = PGD-`steps` (random start) with the network in
    eval mode, then two train-mode forwards, CE(Z', y) + lam * sar_loss(Z', Z). `noise`: the U(0, 1) draw of the random
    start (default: drawn here; norm "L2": a point of the unit ball, the attack in the L2 ball). `gather` (several
    processes): concatenates a per-process tensor over the global batch with autograd, so that the DFT's batch axis is
    the global batch. Returns (loss, adversarial logits, the SAR term detached); lam 0 skips the clean forward (plain
    AT with an eval-mode attack). The network is left in the mode it was given. The caller owns zero_grad, backward
    and the optimiser step. Needs torch, torch.nn.functional as F, sar_loss and attacks.pgd (with cw_loss, which pgd
    names)."""
    was_training = model.training
    model.eval()
    x_adv = pgd(model, x, y, eps, alpha, steps, random_start=True, norm=norm, noise=noise) if eps > 0 else x
    model.train()
    logits_adv = model(x_adv)
    loss = F.cross_entropy(logits_adv.float(), y)
    reg = torch.zeros((), device=x.device)
    if lam > 0:  # gradients flow through both forwards: the clean logits are no detached target
        logits_clean = model(x)
        if gather is not None:
            logits_adv_all, logits_clean_all = gather(logits_adv), gather(logits_clean)
        else:
            logits_adv_all, logits_clean_all = logits_adv, logits_clean
        reg = sar_loss(logits_adv_all, logits_clean_all, fft)
        loss = loss + lam * reg
    model.train(was_training)
    return loss, logits_adv, reg.detach()


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SAR: PGD-AT + spectral alignment regularisation (Huang et al. 2023)")
    # ---- shared run code: the flags ----
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS, help="the data set (see data.py)")
    p.add_argument("--data-dir", default="data", help="where the data set is, or is downloaded to")
    p.add_argument("--arch", default="preact_resnet18", choices=models.ARCHS, help="the network (see models.py)")
    p.add_argument("--epochs", type=within("[1, inf)", int), help="training epochs")
    p.add_argument("--milestones", type=within("[1, inf)", int), nargs="*", help="lr x0.1 after each of these epochs")
    p.add_argument("--lr", type=within("(0, inf)"), default=0.1, help="SGD's lr (the recipe's peak)")
    p.add_argument("--momentum", type=within("[0, 1)"), help="SGD momentum (None: 0.9; --recipe cycles it)")
    p.add_argument("--wd", type=within("[0, inf)"), default=5e-4, help="weight decay")
    p.add_argument("--batch-size", type=within("[1, inf)", int), default=128, help="global batch, split over processes")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="threat model of training and validation")
    p.add_argument("--eps", type=within("[0, inf)", attacks.fraction), help="radius (None: Linf 8/255, L2 128/255)")
    p.add_argument("--alpha", type=within("(0, inf)", attacks.fraction), help="PGD step (None: Linf 2/255, L2 15/255)")
    p.add_argument("--steps", type=within("[0, inf)", int), default=10, help="PGD steps of the training attack")
    p.add_argument("--val-steps", type=within("[1, inf)", int), help="PGD steps of validation")
    p.add_argument("--val-size", type=within("[0, inf)", int), help="held-out training images for choosing best.pt")
    p.add_argument("--val-loss", default="ce", choices=["ce", "cw"], help="the loss of validation's PGD")
    p.add_argument("--augment", default="crop-flip", choices=["crop-flip", *data.IDBH_VARIANTS], help="see data.py")
    p.add_argument("--pad-mode", default="zero", choices=["zero", "reflect"], help="padding of the random crop")
    p.add_argument("--rotate", type=within("[0, 180]"), default=0.0, help="random rotation, max degrees (Rice: 15)")
    p.add_argument("--extra-data", metavar="FILE", help="extra images: Carmon et al.'s .pickle or a generated .npz")
    p.add_argument("--extra-fraction", type=within("(0, 1)"), help="int(f B) of a batch are extra (None: B + B)")
    p.add_argument("--extra-on", default="auto", choices=["auto", "device", "host"], help="where the extra set lives")
    p.add_argument("--wa", action="store_true", help="keep a weight average (see wa.py), validated and saved too")
    p.add_argument("--wa-mode", default="ema", choices=["ema", "swa", "wang2023"], help="the average (see wa.py)")
    p.add_argument("--wa-decay", type=within("(0, 1)"), default=0.999, help="the EMA's decay")
    p.add_argument("--wa-warmup", action="store_true", help="EMA decay min(d, (1+t)/(10+t))")
    p.add_argument("--wa-bn", default="clean", choices=["clean", "adversarial"], help="images of SWA's BatchNorm pass")
    p.add_argument("--save-every", type=within("[1, inf)", int), metavar="K", help="keep epoch_N.pt every K epochs")
    p.add_argument("--out", help=f"output folder (None: runs/{METHOD}-DATASET-ARCH)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--seed", type=within("[0, inf)", int), default=0, help="the weights' and every epoch's draws")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torchrun: each process the GPU of its LOCAL_RANK")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (validation stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--max-batches", type=within("[1, inf)", int), help="stop each epoch after this many batches")
    p.add_argument("--bench", action="store_true", help="images/s: 2 epochs of --max-batches (20), nothing kept")
    p.add_argument("--sync-bn", action="store_true", help="torchrun on GPUs: BatchNorm over the global batch")
    p.add_argument("--timeout", type=within("(0, inf)"), default=600.0, help="torchrun: seconds to wait for a peer")
    p.add_argument("--recipe", choices=["wang2023"], help="Wang et al. 2023's training as released (see WANG2023)")
    # ---- end shared ----
    p.set_defaults(epochs=100, milestones=[75, 90], val_steps=20, val_size=5000, wa_mode="swa")  # the paper's
    p.add_argument("--sar-lambda", type=within("[0, inf)"), default=0.1, help="weight of the spectral alignment term")
    p.add_argument("--sar-start-epoch", type=within("[0, inf)", int), default=0, help="first epoch (0-based) with it")
    p.add_argument("--sar-fft", default="batch_class", choices=["batch_class", "class"],
                   help="2-D DFT over batch and class axes (authors' code), or 1-D over classes per sample")
    args = parse(p, argv)
    if args.bench:
        args.sar_start_epoch = 0  # measure the method with its term on
    return args


def main(argv=None):
    args = get_args(argv)
    # ---- shared run code: set-up ----
    world, rank, device = data.start_processes(args.device, args.timeout)  # torchrun: one process a GPU
    torch.manual_seed(args.seed)  # the same initial weights on every process
    torch.backends.cudnn.benchmark = True
    mem = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # faster convs under autocast
    model = models.get_model(args.arch, *data.classes_and_channels(args.dataset), dataset=args.dataset)
    if args.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        require(device.type == "cuda" or not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
                "--sync-bn: nn.SyncBatchNorm runs on GPUs only; leave it out for CPU processes")
    model = model.to(device, memory_format=mem)
    net = torch.compile(model) if args.compile else model  # model: the weights; net: what the step calls
    if world > 1:  # DDP averages the gradients in backward; BatchNorm buffers are broadcast once an epoch (below)
        net = torch.nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True, broadcast_buffers=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # gradients live in DDP's buckets from the start (see zero_grad below)
    opt = torch.optim.SGD(models.param_groups(model, bn_weight_decay=0.0 if args.recipe else None), lr=args.lr,
                          momentum=args.momentum, weight_decay=args.wd, nesterov=args.recipe is not None)
    warmup = 0.025 * args.epochs * (data.TRAIN_IMAGES[args.dataset] // args.batch_size + 1)  # wang2023's EMA warm-up
    avg = wa.averaged(model, args.wa_mode, args.wa_decay, args.wa_warmup, warmup) if args.wa else None
    wa_start = args.milestones[0] if args.milestones else 0  # SWA averages from the first lr decay on
    start, best, wa_best, history = check_out(args, rank, model, opt, avg)  # new, or resumed; before any data is read
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate,
                   augment=args.augment)
    extra = data.attach_extra(args.extra_data, ds, device, args.extra_on, args.data_dir) if args.extra_data else None
    n_train = len(ds["train_y"])  # sizes: of each global batch of an epoch, b_lab labelled + b_extra extra images
    b_lab, b_extra, sizes = data.geometry(n_train, args.batch_size, extra, args.extra_fraction, args.max_batches)
    if rank == 0:
        models.tidy_folder(args.out)  # made only now (a run that cannot start leaves none); killed writes' temp files
        print(f"{METHOD}.py: {args.arch} on {args.dataset} ({n_train} train, {len(ds['val_y'])} val, {b_extra} extra "
              f"a batch), {device} x {world}, amp={args.amp}, compile={args.compile}, wa=" + wa.describe(
                  args.wa and args.wa_mode, args.wa_decay, args.wa_warmup, wa_start, args.wa_bn, warmup), flush=True)
        models.cpu_note(device, args.arch, ds["train_x"].shape[1:], args.steps, sum(sizes) * (args.epochs - start))
    # ---- end shared ----
    if rank == 0:
        attack = attacks.describe("pgd", args.eps, args.alpha, args.steps, args.norm) + " in eval mode" \
            if args.eps > 0 else "natural training (no attack)"
        print(f"train: {attack}, SAR lambda {args.sar_lambda} ({args.sar_fft}) from epoch {args.sar_start_epoch + 1}",
              flush=True)

    for epoch in range(start, args.epochs):
        # ---- shared run code: the epoch's start ----
        net.train()
        lr, momentum = schedule(args, epoch, opt)  # the epoch's, set (at.py then sets the lr before every step)
        epoch_seed = args.seed * 100_003 + epoch  # 100_003: a prime above any epoch count
        torch.manual_seed(epoch_seed)  # the batches and the step draw from (seed, epoch): a resume repeats the epoch
        tally = torch.zeros(3, device=device)  # the loop adds each batch's loss, correct and TERM sums; read once
        log, t0 = {}, time.time()  # the method's own log entries (train_TERM None: its term was off this epoch)
        # ---- end shared ----
        lam = args.sar_lambda if epoch >= args.sar_start_epoch else 0.0  # before it: plain AT, no clean forward
        if lam == 0:
            log["train_sar"] = None  # the term is off this epoch
        for i, (x, y, noise) in enumerate(data.batches(
                ds["train_x"], ds["train_y"], b_lab, shuffle=True, augment=ds["augment"], seed=epoch_seed, rank=rank,
                world=world, max_batches=len(sizes), memory_format=mem, extra=extra, extra_per_batch=b_extra,
                noise=data.uniform if args.norm == "Linf" else data.unit_ball)):
            # several processes: the DFT runs over the logits of the global batch, gathered with autograd
            gather = data.gatherer(sizes[i], world) if world > 1 else None
            first = models.bn_momentum(model, 1.0 if args.recipe and epoch == i == 0 else None)  # as released
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp), first:
                loss, logits, reg = sar_objective(net, x, y, args.eps, args.alpha, args.steps, lam=lam,
                                                  fft=args.sar_fft, noise=noise, gather=gather, norm=args.norm)
            # set_to_none=False: the gradients stay in DDP's buckets (new ones may get strides that DDP would copy)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            if avg is not None and args.wa_mode != "swa":  # EMA: after every optimiser step
                avg.update_parameters(model)
            tally[0] += loss.detach().float() * len(y)
            tally[1] += (logits.detach().argmax(1) == y).sum()
            tally[2] += reg.float() * len(y)

        # ---- shared run code: the end of the epoch ----
        train_time, seen = time.time() - t0, sum(sizes)
        if avg is not None and args.wa_mode == "swa" and epoch >= wa_start:  # SWA: the end-of-epoch weights
            avg.update_parameters(model)  # then its BatchNorm statistics, from a pass over (clean or PGD) images
            bn_attack = dict(eps=args.eps, alpha=args.alpha, steps=args.steps, norm=args.norm)  # --wa-bn adversarial
            wa.update_bn(avg, ds, model, seen, mem, rank=rank, world=world if args.sync_bn else 1,
                         attack=bn_attack if args.wa_bn == "adversarial" else None)
        if world > 1:  # sums over all processes; rank 0's BatchNorm statistics to all (without --sync-bn they drift)
            dist.all_reduce(tally)
            for b in [*model.buffers(), *(avg.module.buffers() if avg is not None else [])]:
                dist.broadcast(b, 0)
        loss_sum, correct, term_sum = tally.tolist()  # the epoch's one host sync
        if rank == 0:  # validation, the log line, the checkpoints
            wa_ready = avg is not None and int(avg.n_averaged) > 0
            (val_clean, val_pgd), (wa_clean, wa_pgd) = [attacks.accuracy(
                m, ds["val_x"], ds["val_y"], args.eps, args.alpha, args.val_steps, norm=args.norm, loss=args.val_loss)
                if m is not None else (None, None) for m in (model, avg.module if wa_ready else None)]
            if TERM:
                log.setdefault(f"train_{TERM}", term_sum / seen)
            rec = dict(epoch=epoch + 1, lr=lr, momentum=momentum, **log, train_loss=loss_sum / seen,
                       train_acc=100 * correct / seen, val_clean=val_clean, val_pgd=val_pgd, wa_val_clean=wa_clean,
                       wa_val_pgd=wa_pgd, time_s=time.time() - t0, train_time_s=train_time, img_per_s=seen / train_time)
            rec = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in rec.items()}  # no float noise
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                             if v is not None), flush=True)
            history.append(rec)  # log.jsonl is rewritten whole from it: a resumed run's log has no stale lines
            models.atomic_write(os.path.join(args.out, "log.jsonl"),
                                lambda f: f.writelines(json.dumps(r) + "\n" for r in history), mode="w")
            # the checkpoints, atomically; best: by validation PGD accuracy (Rice et al.), clean for natural training
            info = dict(format=models.CKPT_FORMAT, method=METHOD, arch=args.arch, dataset=args.dataset,
                        num_classes=ds["num_classes"], in_channels=ds["channels"], epoch=epoch + 1, args=vars(args),
                        metrics=rec, extra_images=0 if extra is None else len(extra["y"]))
            def save(name, **kw):  # OUT/name, atomically
                models.save_checkpoint(dict(info, **kw), os.path.join(args.out, name))
            score, wa_score = (val_pgd, wa_pgd) if args.eps > 0 else (val_clean, wa_clean)
            if score is not None and score > best:
                best = score
                save("best.pt", model=model.state_dict())
            if wa_score is not None and wa_score > wa_best:
                wa_best = wa_score
                save("wa_best.pt", model=avg.module.state_dict(), weights="wa", wa_n=int(avg.n_averaged))
            if args.save_every and (epoch + 1) % args.save_every == 0:  # snapshots, for vulnerability.py
                save(f"epoch_{epoch + 1}.pt", model=model.state_dict())
            save("last.pt", model=model.state_dict(), optimizer=opt.state_dict(), best=best, wa_best=wa_best,
                 log=history, wa_model=avg.module.state_dict() if wa_ready else None,
                 wa_n=int(avg.n_averaged) if wa_ready else 0)
        # ---- end shared ----

    # ---- shared run code: the end of the run ----
    if rank == 0:  # --bench: the images/s (bench.py turns the line into TFLOP/s); else what to evaluate next
        print(f"benchmark: {rec['img_per_s']:.4g} images/s ({METHOD}.py, {args.arch}, {args.dataset}, batch "
              f"{args.batch_size}, {world} process(es), amp={args.amp}, compile={args.compile})" if args.bench else
              f"done: {METHOD}.py trained to epoch {args.epochs}; files in {args.out}. Next: python eval.py {args.out}"
              f" (its {'best.pt and wa_best.pt' if args.wa else 'best.pt'}, else last.pt)", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    if args.bench:
        shutil.rmtree(args.out, ignore_errors=True)
    return model, avg
    # ---- end shared ----


# ======================================================================================================================
# The plumbing that serves the run: flag checks, the output folder, the error lines. A reader may stop here.
# ======================================================================================================================
# ---- shared run code: helpers ----
def require(ok, message):  # bad input ends in one line naming the problem and the fix
    if not ok:
        raise SystemExit(f"error: {message}")


def schedule(args, t, opt):
    """(lr, momentum) after t epochs (0-based), set in opt's groups: --lr x0.1 per milestone m <= t; --recipe
    wang2023: what torch's OneCycleLR gives after int(t) steps (it is stepped once an epoch, as released)."""
    lr, momentum = args.lr * 0.1 ** sum(t >= m for m in args.milestones), args.momentum
    if args.recipe:
        stand_in = torch.optim.SGD([torch.zeros(1)], lr=args.lr, momentum=args.momentum)  # what the scheduler steps
        cycle = torch.optim.lr_scheduler.OneCycleLR(stand_in, args.lr, total_steps=args.epochs, pct_start=0.025)
        for _ in range(int(t)):
            stand_in.step()
            cycle.step()
        lr, momentum = stand_in.param_groups[0]["lr"], stand_in.param_groups[0]["momentum"]
    for group in opt.param_groups:
        group.update(lr=lr, momentum=momentum)
    return lr, momentum


WANG2023 = dict(batch_size=512, lr=0.2, epochs=400, milestones=[], extra_fraction=0.7, val_size=1024, val_steps=40,
                val_loss="cw", wa=True, wa_mode="wang2023", wa_decay=0.995)  # train-wa.py's 1M-image command


def parse(p, argv, **recipe):
    """The flags, before any work: argparse checks each (within, choices), these relate two; --recipe: its defaults."""
    p.error = lambda message: require(False, f"{message} (--help lists the flags)")
    p._negative_number_matcher = re.compile(r"^-\.?\d")  # -1e-4, -8/255: values, not flags (as Python 3.13's argparse)
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # --help shows every default
    a = p.parse_args(argv)
    if a.recipe:
        p.set_defaults(**{k: v for k, v in {**WANG2023, **recipe}.items() if k != "extra_fraction" or a.extra_data})
        a = p.parse_args(argv)
    require(not a.recipe or a.momentum is None and a.epochs != 40, "--recipe: torch's OneCycleLR cycles the momentum "
            "(leave --momentum out) and divides by zero at --epochs 40 (take 39 or 41)")
    a.momentum = 0.9 if a.momentum is None else a.momentum
    a.out = a.out or os.path.join("runs", f"{METHOD}-{a.dataset}-{a.arch}")
    a.eps = {"Linf": 8 / 255, "L2": 128 / 255}[a.norm] if a.eps is None else a.eps
    a.alpha = {"Linf": 2 / 255, "L2": 15 / 255}[a.norm] if a.alpha is None else a.alpha
    e, ms = attacks.radius(a.eps), " ".join(map(str, a.milestones))
    require(a.norm == "L2" or max(a.eps, a.alpha) <= 1, f"--eps {e}, --alpha {attacks.radius(a.alpha)}: L-inf "
                                                          f"radii and steps are in [0,1] pixel units (8/255, not 8)")
    require(a.steps > 0 or a.eps == 0, f"--steps 0 with --eps {e}: give the attack steps, or --eps 0 for natural")
    require(a.milestones == sorted(set(a.milestones)), f"--milestones {ms}: give increasing epochs")
    require(a.extra_data or a.extra_fraction is None, "--extra-fraction: give the extra images with --extra-data")
    require(a.device == "cpu" or torch.cuda.is_available(), "--device cuda: no CUDA GPU is visible; use --device cpu")
    require(a.batch_size >= int(os.environ.get("WORLD_SIZE", "1")), "--batch-size: give each process an image")
    if any(m >= a.epochs for m in a.milestones) and not a.bench and os.environ.get("RANK", "0") == "0":
        print(f"note: --milestones {ms} with --epochs {a.epochs}: the lr decays only after the milestones below it")
    if a.bench:
        a.epochs, a.max_batches, a.val_size, a.out, a.resume = 2, a.max_batches or 20, 0, tempfile.mkdtemp(), False
    return a


RUN_ONLY = "epochs device compile amp timeout save_every extra_on sync_bn data_dir out".split()


def check_out(args, rank, model, opt, avg):
    """The output folder: writable; a run there is only continued (--resume) as the same experiment: the flags that
    change only how it runs (RUN_ONLY) may change, every other must be the checkpoint's. Loads its state. Returns
    (epochs done, best, wa_best, the log's records so far)."""
    top = os.path.abspath(args.out)
    while not os.path.exists(top):
        top = os.path.dirname(top)
    require(os.path.isdir(top) and os.access(top, os.W_OK), f"cannot write to {args.out}; pass --out to a folder")
    last = os.path.join(args.out, "last.pt")
    if not os.path.exists(last):
        return 0, -1.0, -1.0, []
    require(args.resume, f"{args.out} already holds a run (last.pt); pass --resume to continue it, or another --out")
    ck = models.load_checkpoint(last)
    require(isinstance(ck, dict) and ck.get("format") == models.CKPT_FORMAT and "optimizer" in ck,
            f"{last} is not a last.pt written by this project; pass --out for a new run")
    require(ck["method"] == METHOD, f"{last} holds a run of {ck['method']}.py; pass --out for a new run")
    flags = {k: (ck["args"][k], v) for k, v in vars(args).items() if k != "resume" and ck["args"].get(k, v) != v}
    other = [f"--{k.replace('_', '-')} {a} (given {b})" for k, (a, b) in flags.items()
             if k not in RUN_ONLY or k == "epochs" and args.recipe]  # the recipe's lr and EMA warm-up span the run
    require(not other, f"{last} holds another experiment: {', '.join(other)}; resume with those, or --out a new run")
    if rank == 0:
        changed = ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in flags.items())
        print(f"resuming {last} at epoch {ck['epoch']}" + (f"; changed flags: {changed}" if changed else ""))
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if ck["wa_model"] is not None:
        avg.module.load_state_dict(ck["wa_model"])
        avg.n_averaged.fill_(ck["wa_n"])
    return ck["epoch"], ck["best"], ck["wa_best"], ck.get("log", [])


def cli(argv=None):
    """The command line: one error line, printed once under torchrun, also from a process that lost the others."""
    try:
        return main(argv)
    except (SystemExit, models.InputError) as e:  # bad input, from here or the modules: under torchrun rank 0 prints
        line = f"error: {e}" if isinstance(e, models.InputError) else e.code
        raise SystemExit(1 if isinstance(line, str) and os.environ.get("RANK", "0") != "0" else line) from None
    except RuntimeError as e:  # a failed collective: one line (data.lost_contact); any other error as it is
        raise SystemExit(data.lost_contact(e)) from None


if __name__ == "__main__":
    cli()
# ---- end shared ----
