"""ISEAT: instance-adaptive smoothness enhanced adversarial training.

Li and Spratling, "Improved adversarial training through adaptive instance-wise loss smoothing" (2023):
PGD-AT + adversarial weight perturbation (AWP, Wu et al. 2020) + an instance-weighted logit-pairing term,

    L = mean_i CE(f_{theta+gamma v}(x'_i), y_i) + (lambda/B) sum_i w_i || f_{theta+gamma v}(x'_i) - f_theta(x_i) ||^2

x' = PGD-10 without random start (train mode); v the AWP direction, per conv/linear kernel l:
v_l = ||theta_l|| d_l / (||d_l|| + 1e-20), d_l the change of theta_l after one plain SGD step (lr eta = 0.01) of a
proxy copy on minus the adversarial CE; gamma = 7e-3. w_i = j/B for the sample at position j of the vulnerabilities
av_i = CE_adv_i - CE_clean_i sorted ascending (the most vulnerable gets 1). The clean branch's gradient is taken at
theta, the adversarial branch's at theta + gamma v, and the two are added; the optimiser steps at the perturbed
point and the perturbation is then removed (as in the authors' AWP code). lambda is set per lr stage: 0 before the
first milestone, 0.1 after (--lam 0 0.1), so the first stage is exactly AT-AWP.
Where the code differs in form, not in result, from the authors': the adversarial forward at theta + gamma v is
taken out of place (torch.func.functional_call), so the clean forward at theta serves as the unperturbed branch:
no copy of the model is made per batch and no third forward is needed. While lambda is 0 the clean forward is
skipped (its only effect would be on BatchNorm's running statistics), so that stage is exactly AT-AWP.
Ablations: --awp-gamma 0 --lam 0 is PGD-AT without random start; --lam 0 is AT-AWP with ISEAT's gamma, and
--lam 0 --awp-gamma 0.01 --random-start is AT-AWP as Wu et al. ran it.

    python iseat.py                      # PreActResNet-18, CIFAR-10, 200 epochs, lr x0.1 at 100 and 150
    python iseat.py --arch wrn34_10      # the authors' README configuration
    torchrun --nproc_per_node=4 iseat.py --amp   # 4 GPUs (the AWP direction is computed from the global batch)
"""
import argparse
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call

import attacks
import data
import models
import utils
import wa


def get_args(argv=None):
    p = argparse.ArgumentParser(description="ISEAT: AWP + instance-adaptive logit smoothing (Li and Spratling 2023)")
    p.add_argument("--dataset", default="cifar10", help=", ".join(data.DATASETS))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--arch", default="preact_resnet18", help=", ".join(models.ARCHS))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--milestones", type=int, nargs="*", default=[100, 150], help="epochs where lr is multiplied by 0.1")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split across torchrun processes")
    p.add_argument("--eps", type=utils.fraction, default="8/255", help="L-inf radius (8/255 or a number; 0: natural)")
    p.add_argument("--alpha", type=utils.fraction, default="2/255", help="PGD step size")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    p.add_argument("--val-steps", type=int, default=10, help="PGD steps of validation (Rice et al.: 10)")
    p.add_argument("--val-size", type=int, default=1000, help="held-out training images for choosing best.pt")
    p.add_argument("--pad-mode", default="zero", choices=["zero", "reflect"], help="padding of the random crop")
    p.add_argument("--rotate", type=float, default=0.0, help="random rotation, max degrees (Rice's CIFAR-100: 15)")
    p.add_argument("--wa", action="store_true", help="keep a weight average (see wa.py) and validate it too")
    p.add_argument("--wa-mode", default="ema", choices=["ema", "swa"])
    p.add_argument("--wa-decay", type=float, default=0.999)
    p.add_argument("--wa-warmup", action="store_true", help="EMA decay min(d, (1+t)/(10+t))")
    p.add_argument("--wa-bn", default="clean", choices=["clean", "adversarial"],
                   help="images of SWA's BatchNorm recomputation (adversarial: PGD examples, for PGD-AT)")
    p.add_argument("--awp-gamma", type=float, default=7e-3, help="size of the weight perturbation (0: no AWP)")
    p.add_argument("--awp-eta", type=float, default=0.01, help="lr of the proxy's ascent step")
    p.add_argument("--random-start", action="store_true",
                   help="start the training PGD at a random point of the ball (Wu et al.'s AWP; ISEAT does not)")
    p.add_argument("--lam", type=float, nargs="+", default=[0.0, 0.1],
                   help="lambda per lr stage (before the first milestone, after it, ...); the last value repeats")
    p.add_argument("--out", default=None, help="output folder (default runs/iseat-DATASET-ARCH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (evaluation stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training and attacks")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--bench", action="store_true",
                   help="measure images/s: 2 epochs of --max-batches (20) batches, no validation, nothing kept")
    args = utils.parse_args(p, argv)
    args.out = args.out or os.path.join("runs", f"iseat-{args.dataset}-{args.arch}")
    utils.check_train_args(args)
    utils.require(args.awp_gamma >= 0, f"--awp-gamma {args.awp_gamma:g}: use a size >= 0 (0: no AWP)")
    utils.require(args.awp_eta > 0, f"--awp-eta {args.awp_eta:g}: use a positive proxy step")
    utils.require(all(v >= 0 for v in args.lam), f"--lam {' '.join(map(str, args.lam))}: use weights >= 0")
    if args.bench:
        utils.bench_settings(args)
        args.lam = [max(args.lam)]  # measure the method with its smoothing term on
    return args


def rank_weights(av):
    """Sort av ascending (stable: ties keep their batch order); the sample at position j = 1..B gets j / B."""
    B = len(av)
    w = torch.empty(B, device=av.device)
    w[torch.sort(av, stable=True).indices] = torch.arange(1, B + 1, device=av.device, dtype=torch.float) / B
    return w


def awp_diff(model, proxy, x_adv, y, eta=0.01):
    """AWP direction: copy the weights to `proxy`, take one plain SGD step (lr eta, no momentum, no weight decay)
    on minus its mean adversarial CE, and return {name: ||theta_l|| * d_l / (||d_l|| + 1e-20)} with d_l the change
    of each parameter with 2 or more dimensions (conv and linear kernels; not BatchNorm, not biases)."""
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    names = [n for n, p in proxy.named_parameters() if p.dim() >= 2]
    qs = dict(proxy.named_parameters())
    grads = torch.autograd.grad(-F.cross_entropy(proxy(x_adv).float(), y), [qs[n] for n in names])
    if dist.is_initialized():  # several processes: the direction of the global batch, the same on every rank
        for g in grads:
            dist.all_reduce(g)
            g /= dist.get_world_size()
    own = dict(model.named_parameters())
    v = {}
    with torch.no_grad():
        for n, g in zip(names, grads):
            qs[n].sub_(eta * g)  # the proxy's SGD step on -CE: an ascent step on CE
            d = qs[n] - own[n]
            v[n] = own[n].norm() * d / (d.norm() + 1e-20)
    return v


def perturb(model, v, gamma):
    """theta_l += gamma * v_l; returns the unperturbed tensors for restore()."""
    own, saved = dict(model.named_parameters()), {}
    with torch.no_grad():
        for n, d in v.items():
            saved[n] = own[n].detach().clone()
            own[n].add_(d, alpha=gamma)
    return saved


def restore(model, v, gamma, saved):
    """theta_l -= gamma * v_l, written as saved + (theta_l - (saved + gamma v_l)): it keeps the optimiser's update
    made at the perturbed point, and gives back the saved weights bitwise when there was none."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for n, d in v.items():
            own[n].copy_(saved[n] + (own[n] - saved[n].add(d, alpha=gamma)))


def train_step(model, proxy, opt, x, y, eps, alpha, steps, gamma, eta, lam, amp=False, fast=None, wrapped=None,
               random_start=False):
    """One ISEAT step; returns (loss, adversarial logits, weighted smoothing term), all detached.
    `fast` (default model) runs the clean forward and the attack, e.g. torch.compile(model); `wrapped` (default model)
    runs the adversarial forward, e.g. DistributedDataParallel(model)."""
    fast = model if fast is None else fast
    wrapped = model if wrapped is None else wrapped
    prefix = "module." if wrapped is not model else ""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        # 1. clean forward at theta (train mode): the unperturbed branch of the smoothing term and CE_clean
        logits_clean = fast(x) if lam > 0 else None
        # 2. PGD-10 without random start (--random-start: Wu et al.'s AWP), network in train mode
        x_adv = attacks.pgd(fast, x, y, eps, alpha, steps, random_start=random_start) if eps > 0 else x
        # 3. AWP direction from one ascent step of the proxy
        v = awp_diff(model, proxy, x_adv, y, eta) if gamma > 0 else {}
        # 4. adversarial forward at theta + gamma v, out of place so the clean graph at theta stays valid
        params = {prefix + n: p + gamma * v[n] if n in v else p for n, p in model.named_parameters()}
        logits_adv = functional_call(wrapped, params, (x_adv,))
        ce_adv = F.cross_entropy(logits_adv.float(), y, reduction="none")
        loss = ce_adv.mean()
        reg = torch.zeros((), device=x.device)
        if lam > 0:
            # 5. rank weights from the vulnerability CE_adv - CE_clean (detached), recomputed every batch
            ce_clean = F.cross_entropy(logits_clean.float(), y, reduction="none")
            w = rank_weights((ce_adv - ce_clean).detach())
            # 6. weighted squared L2 between adversarial (theta + gamma v) and clean (theta) logits, both with gradients
            reg = (w * (logits_adv.float() - logits_clean.float()).pow(2).sum(1)).sum() / len(y)
            loss = loss + lam * reg
    # 7. the gradients of both branches add up on theta; the optimiser steps at the perturbed point, then the
    # perturbation is removed. (The attack and the proxy took no gradient of the model's parameters.)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    saved = perturb(model, v, gamma)
    opt.step()
    restore(model, v, gamma, saved)
    return loss.detach(), logits_adv.detach(), reg.detach()


def main(argv=None):
    args = get_args(argv)
    device, rank, world = utils.distributed_setup(args.device)  # world > 1 under torchrun
    main_rank = rank == 0  # only rank 0 prints, logs, validates and writes checkpoints
    utils.require(args.batch_size >= world, f"--batch-size {args.batch_size} is smaller than the {world} processes")
    eps, alpha = args.eps, args.alpha
    torch.manual_seed(args.seed)  # the same on every rank: same initial weights, permutations, crops
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    mem = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    # ---- the output folder before any work: writable, no clobbering, resume only what can be resumed exactly
    ck = utils.start_run(args, "iseat", main_rank)

    # ---- data: uint8 tensors on the device; a fixed-seed validation split of the training set
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate)
    n_train = len(ds["train_x"])
    nb = data.num_batches(n_train, args.batch_size, args.max_batches)

    # ---- model, optimiser, schedule (piecewise x0.1 at the milestones, stepped once per epoch)
    model = models.get_model(args.arch, ds["num_classes"], ds["channels"]).to(device, memory_format=mem)
    fast = torch.compile(model) if args.compile else model  # used for the attack and the clean forward
    # Several processes: the adversarial forward (at the perturbed weights) goes through DDP, which averages
    # gradients across ranks in backward; attack, proxy and clean forward run on the plain module.
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    proxy = models.get_model(args.arch, ds["num_classes"], ds["channels"]).to(device, memory_format=mem)  # reused
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)
    avg = wa.averaged(model, args.wa_mode, args.wa_decay, args.wa_warmup) if args.wa else None
    wa_start = args.milestones[0] if args.milestones else 0  # SWA averages from the first lr decay on

    # ---- resume: everything needed to continue exactly is in last.pt
    start_epoch, best, wa_best = utils.resume(ck, args, model, opt, sched, avg, main_rank)
    train_attack = attacks.describe("pgd", eps, args.steps, alpha) if eps > 0 else "natural training (no attack)"
    if not args.random_start:
        train_attack = train_attack.replace("random start", "no random start")
    if main_rank:
        print(f"iseat.py: {args.arch} on {args.dataset} ({n_train} train / {len(ds['val_x'])} val), "
              f"{device} x {world}, "
              f"train {train_attack}, validation {'clean' if eps == 0 else f'clean + PGD-{args.val_steps}'}, "
              f"amp={args.amp}, compile={args.compile}, wa={utils.describe_wa(args)}, AWP gamma {args.awp_gamma:g}, "
              f"lambda per lr stage {args.lam}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness (order, crops, PGD starts) is a function of (seed, epoch): a resumed run repeats it
        epoch_seed = args.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        model.train()
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device)  # metrics stay on the device; read once per epoch
        n_correct = torch.zeros((), device=device, dtype=torch.long)
        reg_sum = torch.zeros((), device=device)
        stage = sum(epoch >= m for m in args.milestones)  # lambda is set per lr stage
        lam = args.lam[min(stage, len(args.lam) - 1)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        seen = 0
        for i, (x, y) in enumerate(data.batches(ds["train_x"], ds["train_y"], args.batch_size, shuffle=True,
                                                augment=ds["augment"], seed=epoch_seed, rank=rank, world=world,
                                                max_batches=args.max_batches, memory_format=mem)):
            loss, logits, reg = train_step(model, proxy, opt, x, y, eps, alpha, args.steps, args.awp_gamma,
                                           args.awp_eta, lam, args.amp, fast, wrapped, args.random_start)
            reg_sum += reg * len(y)
            wa.after_step(avg, model, args.wa_mode)
            loss_sum += loss.detach() * len(y)
            n_correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if main_rank:
                utils.progress(i + 1, nb, t0, f"epoch {epoch + 1}")
        # the epoch's metrics, summed over ranks: the one host sync of the epoch (it waits for the GPU)
        loss_sum, n_correct, reg_sum, seen = utils.reduce_sum(loss_sum, n_correct, reg_sum, seen, device=device)
        train_time = time.time() - t0
        sched.step()

        # ---- weight averaging at the end of the epoch (SWA update + BatchNorm recomputation)
        wa_ready = wa.after_epoch(avg, model, args.wa_mode, epoch, wa_start, utils.bn_batches(ds, args, mem, model))
        # BatchNorm statistics drift apart per rank within an epoch: every rank keeps rank 0's
        utils.broadcast_buffers(model, avg.module if avg is not None else None)
        if not main_rank:
            continue

        # ---- validation (Rice et al.: keep the checkpoint with the best held-out PGD accuracy)
        val_clean, val_pgd = utils.validate(model, ds, eps, alpha, args.val_steps)
        wa_clean, wa_pgd = utils.validate(avg.module, ds, eps, alpha, args.val_steps) if wa_ready else (None, None)
        rec = utils.tidy(dict(epoch=epoch + 1, lr=lr, lam=lam, train_loss=loss_sum / seen,
                              train_acc=100 * n_correct / seen, train_smooth=reg_sum / seen if lam > 0 else None,
                              val_clean=val_clean, val_pgd=val_pgd, wa_val_clean=wa_clean, wa_val_pgd=wa_pgd,
                              time=time.time() - t0, train_time=train_time, img_per_s=seen / train_time))
        utils.log_epoch(args.out, rec)

        # ---- checkpoints, each written atomically: best.pt / wa_best.pt when validation improves, then last.pt
        info = utils.meta(args, "iseat", ds, epoch + 1, rec)
        best, wa_best = utils.save_epoch(args, info, model, opt, sched, avg, best, wa_best)
    if args.bench:
        if main_rank:  # forward-equivalents per image: PGD steps 2 each; adversarial, clean and proxy passes 3 each
            passes = 2 * args.steps * (eps > 0) + 3 + 3 * (max(args.lam) > 0) + 3 * (args.awp_gamma > 0)
            utils.bench_report(args, model, ds, rec, world, passes)
        shutil.rmtree(args.out, ignore_errors=True)
    utils.distributed_cleanup()
    return model, avg


if __name__ == "__main__":
    utils.cli(main)
