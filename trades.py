"""TRADES: the trade-off between robustness and accuracy, as a regularised loss.

Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019:

    L = CE(f(x), y) + beta * (1/B) sum_i KL( softmax f(x_i) || softmax f(x'_i) ),   beta = 6
    x' = PGD-10 maximising sum_i KL( softmax f(x_i) || softmax f(x'_i) )  within the eps-ball and [0,1]

The KL is summed over classes and averaged over the batch; gradients flow through both branches (the clean softmax
is no detached target). As the authors' released code (trades.py) defines it:
  - the attack maximises the KL with the network in eval mode, from x + 0.001 N(0, I) (not clipped before the first
    step), sign steps, projection on the ball and the box; the clean softmax it aims away from is computed once per
    batch (the released loop recomputes the same eval-mode value at every step);
  - the loss is taken in train mode. The released code sends the clean batch through the network twice (once for
    the CE, once for the KL target); both give the same logits in train mode, so one clean forward serves both here:
    the loss and its gradient are the same, BatchNorm's running statistics see the clean batch once per step, not
    twice.
Where this repository's protocol differs from the released script (train_trades_cifar10.py): eps 8/255 and step
2/255 rather than 0.031 and 0.007; 100 epochs with lr x0.1 after epochs 75 and 90 rather than 76 epochs; weight
decay 5e-4 rather than 2e-4; a held-out validation split chooses best.pt (the released script keeps every epoch's
weights). --released sets the script's values, its schedule in its own epoch convention: the script counts epochs
from 1 and sets lr x0.1 from `epoch >= 75` (then 90, 100), so its epochs 75 and 76 run at 0.01; here --milestones
are the epochs after which the lr decays, so that is --milestones 74 89 99 (of which only 74 is reached in 76).

The paper's network is WRN-34-10 in the layout of the TRADES release (--arch wrn34_10). Wang et al. 2023 ("Better
diffusion models further improve adversarial training", ICML 2023; DM-Improves-AT's gowal21uncovering/utils/
trades.py) train TRADES on generated images with the SiLU WideResNet-28-10 and -70-16 (--arch wrn28_10_silu,
wrn70_16_silu) and attack otherwise (--recipe wang2023, trades_attack's dm): in train mode with BatchNorm's running
statistics neither used nor updated, from x + U(-eps, eps) clipped to [0, 1]; beta 5, label smoothing 0.1 on the
clean CE term, the KL averaged over the batch as here.

    python trades.py                               # PreActResNet-18, CIFAR-10
    python trades.py --arch wrn28_10_silu --extra-data 1m.npz --recipe wang2023   # Wang et al. 2023's run
    python trades.py --arch wrn34_10 --released    # the released script's network and settings
    python trades.py --beta 1                      # the paper's other operating point

Below: the method, its flags, main, the plumbing; the "shared run code" is every method file's (a test keeps it so).
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attacks
import data
import models
import wa
from attacks import within

METHOD = "trades"
TERM = "kl"  # the KL term, logged as train_kl


def trades_kl(logits_adv, logits_clean):
    """(1/B) sum_i KL( softmax z_i || softmax z'_i ) = (1/B) sum_i sum_c p_ic (log p_ic - log p'_ic), in float32,
    with gradients into both arguments (KLDivLoss(reduction="sum") of the released code, divided by B)."""
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    p_clean = F.softmax(logits_clean.float(), dim=1)
    return F.kl_div(log_p_adv, p_clean, reduction="sum") / len(logits_adv)


def trades_loss(logits_adv, logits_clean, y, beta=6.0, label_smoothing=0.0):
    """CE(f(x), y) + beta * (1/B) sum_i KL( softmax f(x_i) || softmax f(x'_i) ); label_smoothing s: the CE's target
    is (1 - s) one-hot + s / C (Wang et al.'s recipe: 0.1; the released TRADES: 0)."""
    return F.cross_entropy(logits_clean.float(), y, label_smoothing=label_smoothing) + \
        beta * trades_kl(logits_adv, logits_clean)


def trades_attack(model, x, eps, alpha, steps, noise=None, norm="Linf", dm=False):
    """PGD on the KL to the clean prediction (no labels), input gradients only. As the TRADES release: from
    x + 0.001 N(0, I) (`noise`: the N(0, I) draw; default: drawn here), the network in eval mode whatever mode it was
    given. dm, as DM-Improves-AT's (Wang et al. 2023; L-inf): from x + U(-eps, eps) clipped to [0, 1] (`noise`: the
    U(0, 1) draw), the network in train mode with BatchNorm's running statistics neither used nor updated (each
    forward normalises with its own batch's statistics). The mode is restored after, the running statistics are never
    touched."""
    was_training = model.training
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if dm else []
    tracked = [m.track_running_stats for m in layers]  # given back after, as they were
    model.train(dm)
    for m in layers:
        m.track_running_stats = False  # train mode without tracking: the batch's statistics, the running ones untouched
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)
    if dm:
        x_adv = (x + (2 * (torch.rand_like(x) if noise is None else noise) - 1) * eps).clamp(0, 1)
    else:
        x_adv = x + 0.001 * (torch.randn_like(x) if noise is None else noise)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_clean, reduction="sum")
        (g,) = torch.autograd.grad(kl, x_adv)
        if norm == "Linf":
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        else:  # a step along the normalised gradient, the box, then back into the L2 ball
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))
            x_adv = x + ((x_adv.detach() + alpha * g).clamp(0, 1) - x).renorm(2, 0, eps)
    for m, t in zip(layers, tracked):
        m.track_running_stats = t
    model.train(was_training)
    return x_adv.clamp(0, 1).detach()


def trades_objective(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, beta=6.0, noise=None, norm="Linf",
                     label_smoothing=0.0, dm=False):
    """TRADES' loss on one batch, as the released trades_loss: the KL attack in eval mode (dm: DM-Improves-AT's, see
    trades_attack), then in train mode one clean and one adversarial forward, CE(f(x), y) + beta * KL, gradients
    through both. `noise`: the draw of the start (N(0, I); dm: U(0, 1); default: drawn here). Returns (loss,
    adversarial logits, the KL term detached); the caller owns zero_grad, backward and the optimiser step; the
    network is left in the mode it was given. Needs torch and torch.nn.functional as F."""
    was_training = model.training
    x_adv = trades_attack(model, x, eps, alpha, steps, noise=noise, norm=norm, dm=dm) if eps > 0 else x
    model.train()
    logits_clean = model(x)  # feeds the CE and the KL target
    logits_adv = model(x_adv)
    loss = trades_loss(logits_adv, logits_clean, y, beta, label_smoothing)
    model.train(was_training)
    return loss, logits_adv, trades_kl(logits_adv.detach(), logits_clean.detach())


def get_args(argv=None):
    p = argparse.ArgumentParser(description="TRADES (Zhang et al. 2019), as the authors' released code defines it")
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
    p.set_defaults(epochs=100, milestones=[75, 90], val_steps=10, val_size=1000)  # the SAR paper's baseline schedule
    p.add_argument("--beta", type=within("[0, inf)"), default=6.0, help="weight of the KL term")
    p.add_argument("--label-smoothing", type=within("[0, 1)"), default=0.0,
                   help="label smoothing of the clean CE term (Wang et al. 2023's generated-data recipe: 0.1)")
    p.add_argument("--released", action="store_true",
                   help="the released script's settings: eps 0.031, step 0.007, weight decay 2e-4, 76 epochs, "
                        "lr x0.1 from its epoch 75 (--milestones 74 89 99) (flags given explicitly still win)")
    if "--released" in (sys.argv[1:] if argv is None else argv):  # flags given explicitly still win
        p.set_defaults(eps=0.031, alpha=0.007, wd=2e-4, epochs=76, milestones=[74, 89, 99])
    args = parse(p, argv, beta=5.0, label_smoothing=0.1)  # --recipe wang2023: the release's beta and smoothing too
    require(args.norm == "Linf" or not args.recipe, "--recipe wang2023 with --norm L2: Wang et al.'s TRADES attack is "
                                                   "L-inf here; drop one of them")
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
        how = "start x + U(-eps, eps), train mode, BatchNorm statistics of the batch" if args.recipe else \
            "start x + 0.001 N(0, I), eval mode"
        attack = f"PGD-{args.steps} on KL(f(x) || f(x')) ({args.norm}, eps {attacks.radius(args.eps, args.norm)}, " \
            f"step {attacks.radius(args.alpha, args.norm)}, {how})" if args.eps > 0 else "natural training (no attack)"
        print(f"train: {attack}, beta {args.beta:g}", flush=True)

    for epoch in range(start, args.epochs):
        # ---- shared run code: the epoch's start ----
        net.train()
        lr, momentum = schedule(args, epoch, opt)  # the epoch's, set (at.py then sets the lr before every step)
        epoch_seed = args.seed * 100_003 + epoch  # 100_003: a prime above any epoch count
        torch.manual_seed(epoch_seed)  # the batches and the step draw from (seed, epoch): a resume repeats the epoch
        tally = torch.zeros(3, device=device)  # the loop adds each batch's loss, correct and TERM sums; read once
        log, t0 = {}, time.time()  # the method's own log entries (train_TERM None: its term was off this epoch)
        # ---- end shared ----
        for i, (x, y, noise) in enumerate(data.batches(
                ds["train_x"], ds["train_y"], b_lab, shuffle=True, augment=ds["augment"], seed=epoch_seed, rank=rank,
                world=world, max_batches=len(sizes), memory_format=mem, extra=extra, extra_per_batch=b_extra,
                noise=data.uniform if args.recipe else data.gaussian)):
            first = models.bn_momentum(model, 1.0 if args.recipe and epoch == i == 0 else None)  # as released
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp), first:
                loss, logits, kl = trades_objective(net, x, y, args.eps, args.alpha, args.steps, beta=args.beta,
                                                    noise=noise, norm=args.norm, label_smoothing=args.label_smoothing,
                                                    dm=args.recipe is not None)
            # set_to_none=False: the gradients stay in DDP's buckets (new ones may get strides that DDP would copy)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            if avg is not None and args.wa_mode != "swa":  # EMA: after every optimiser step
                avg.update_parameters(model)
            tally[0] += loss.detach().float() * len(y)
            tally[1] += (logits.detach().argmax(1) == y).sum()
            tally[2] += kl.float() * len(y)

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
