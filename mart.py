"""MART: misclassification-aware adversarial training.

Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness Requires Revisiting Misclassified Examples",
ICLR 2020:

    L = BCE(f(x'), y) + beta * (1/B) sum_i KL( p(x_i) || p(x'_i) ) * (1 - p_y(x_i)),   beta = 6
    BCE(f(x'), y) = CE(f(x'), y) - (1/B) sum_i log(1 - max_{k != y_i} p_k(x'_i))         ("boosted" CE)

p = softmax f; x' = PGD-10 on CE. The KL (summed over classes) is weighted per image by how badly the clean image
is classified, 1 - p_y(x), so misclassified images weigh most. As the authors' released code (mart.py) defines it:
  - the attack runs with the network in eval mode, from x + 0.001 N(0, I), sign steps on the mean CE;
  - the loss is taken in train mode, clean forward first, then the adversarial one, gradients through both (the
    weight 1 - p_y(x) and the KL target included);
  - the small constants are kept as released: log(1.0001 - p' + 1e-12) in the boosted term (the largest wrong class
    is the larger of the top two of p'), log(p' + 1e-12) in the KL, and a weight of 1.0000001 - p_y(x).
Where this repository's protocol differs from the released scripts: eps 8/255 and step 2/255 rather than 0.031 and
0.007; 100 epochs with lr x0.1 at 75 and 90 and weight decay 5e-4. The released WideResNet script runs lr 0.1,
weight decay 2e-4, 76 epochs, x0.1 at 75 (a later revision: 90 epochs, weight decay 7e-4); --released sets those
values. Its ResNet-18 script uses lr 0.01, weight decay 3.5e-3, 120 epochs and beta 5: pass them as flags. Small
networks may need the smaller lr: at lr 0.1 the small CNN collapsed to a constant prediction in its first epoch on
Fashion-MNIST, and trained normally at --lr 0.01.

    python mart.py                                 # PreActResNet-18, CIFAR-10
    python mart.py --arch wrn34_10 --released      # the released WideResNet script's settings
"""
import argparse
import os
import shutil
import time

import torch
import torch.nn.functional as F

import attacks
import data
import models
import utils
import wa


def get_args(argv=None):
    p = argparse.ArgumentParser(description="MART (Wang et al. 2020), as the authors' released code defines it")
    p.add_argument("--dataset", default="cifar10", help=", ".join(data.DATASETS))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--arch", default="preact_resnet18", help=", ".join(models.ARCHS))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--milestones", type=int, nargs="*", default=[75, 90], help="epochs where lr is multiplied by 0.1")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split across torchrun processes")
    p.add_argument("--eps", type=utils.fraction, default="8/255", help="L-inf radius (8/255 or a number; 0: natural)")
    p.add_argument("--alpha", type=utils.fraction, default="2/255", help="PGD step size")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the training attack")
    p.add_argument("--val-steps", type=int, default=10, help="PGD steps of validation (as Rice et al.: 10)")
    p.add_argument("--val-size", type=int, default=1000, help="held-out training images for choosing best.pt")
    p.add_argument("--pad-mode", default="zero", choices=["zero", "reflect"], help="padding of the random crop")
    p.add_argument("--rotate", type=float, default=0.0, help="random rotation, max degrees (Rice's CIFAR-100: 15)")
    p.add_argument("--wa", action="store_true", help="keep a weight average (see wa.py) and validate it too")
    p.add_argument("--wa-mode", default="ema", choices=["ema", "swa"])
    p.add_argument("--wa-decay", type=float, default=0.999)
    p.add_argument("--wa-warmup", action="store_true", help="EMA decay min(d, (1+t)/(10+t))")
    p.add_argument("--wa-bn", default="clean", choices=["clean", "adversarial"],
                   help="images of SWA's BatchNorm recomputation (adversarial: PGD examples, for PGD-AT)")
    p.add_argument("--beta", type=float, default=6.0, help="weight of the KL term")
    p.add_argument("--released", action="store_true",
                   help="the released WideResNet script's settings: eps 0.031, step 0.007, weight decay 2e-4, "
                        "76 epochs, lr x0.1 at 75, 90, 100 (flags given explicitly still win)")
    p.add_argument("--out", default=None, help="output folder (default runs/mart-DATASET-ARCH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (evaluation stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training and attacks")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--bench", action="store_true",
                   help="measure images/s: 2 epochs of --max-batches (20) batches, no validation, nothing kept")
    known, _ = p.parse_known_args(argv)
    if known.released:  # the released script's defaults; flags given on the command line still win
        p.set_defaults(eps=0.031, alpha=0.007, wd=2e-4, epochs=76, milestones=[75, 90, 100])
    args = utils.parse_args(p, argv)
    args.out = args.out or os.path.join("runs", f"mart-{args.dataset}-{args.arch}")
    utils.check_train_args(args)
    utils.require(args.beta >= 0, f"--beta {args.beta:g}: use a weight >= 0")
    if args.bench:
        utils.bench_settings(args)
    return args


def mart_loss(logits_adv, logits_clean, y, beta=6.0):
    """Boosted CE on the adversarial logits + beta * (1/B) sum_i KL(p(x_i) || p(x'_i)) (1 - p_y(x_i)); float32,
    gradients into both arguments. Constants as in the released code."""
    return mart_boosted_ce(logits_adv, y) + beta * mart_weighted_kl(logits_adv, logits_clean, y)


def mart_boosted_ce(logits_adv, y):
    """CE(z', y) + mean_i -log(1.0001 - p'_{i,k_i} + 1e-12), k_i the most likely wrong class of x'_i."""
    p_adv = F.softmax(logits_adv.float(), dim=1)
    top2 = torch.argsort(p_adv, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # the largest class that is not y
    return F.cross_entropy(logits_adv.float(), y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)


def mart_weighted_kl(logits_adv, logits_clean, y):
    """(1/B) sum_i [sum_c p_ic (log p_ic - log(p'_ic + 1e-12))] (1.0000001 - p_{i,y_i}), p clean, p' adversarial."""
    p_adv = F.softmax(logits_adv.float(), dim=1)
    p_clean = F.softmax(logits_clean.float(), dim=1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(1)
    return (kl * (1.0000001 - p_clean.gather(1, y[:, None])[:, 0])).sum() / len(y)


def mart_attack(model, x, y, eps, alpha, steps):
    """PGD on the mean CE from x + 0.001 N(0, I) (the released code's start); input gradients only."""
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv).float(), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.clamp(0, 1).detach()


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
    ck = utils.start_run(args, "mart", main_rank)

    # ---- data: uint8 tensors on the device; a fixed-seed validation split of the training set
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate)
    n_train = len(ds["train_x"])
    nb = data.num_batches(n_train, args.batch_size, args.max_batches)

    # ---- model, optimiser, schedule (piecewise x0.1 at the milestones, stepped once per epoch)
    model = models.get_model(args.arch, ds["num_classes"], ds["channels"]).to(device, memory_format=mem)
    fast = torch.compile(model) if args.compile else model  # used for the attack and the clean forward
    # Several processes: the adversarial forward goes through DDP, which averages gradients across ranks in
    # backward; the attack and the clean forward run on the plain module (one DDP forward per backward).
    train_model = torch.nn.parallel.DistributedDataParallel(fast) if world > 1 else fast
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)
    avg = wa.averaged(model, args.wa_mode, args.wa_decay, args.wa_warmup) if args.wa else None
    wa_start = args.milestones[0] if args.milestones else 0  # SWA averages from the first lr decay on

    # ---- resume: everything needed to continue exactly is in last.pt
    start_epoch, best, wa_best = utils.resume(ck, args, model, opt, sched, avg, main_rank)
    train_attack = (f"PGD-{args.steps} on CE (Linf, eps {attacks.radius(eps)}, step {attacks.radius(alpha)}, "
                    f"start x + 0.001 N(0, I), eval mode)" if eps > 0 else "natural training (no attack)")
    if main_rank:
        print(f"mart.py: {args.arch} on {args.dataset} ({n_train} train / {len(ds['val_x'])} val), "
              f"{device} x {world}, "
              f"train {train_attack}, validation {'clean' if eps == 0 else f'clean + PGD-{args.val_steps}'}, "
              f"amp={args.amp}, compile={args.compile}, wa={utils.describe_wa(args)}, beta {args.beta:g}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness (order, crops, PGD starts) is a function of (seed, epoch): a resumed run repeats it
        epoch_seed = args.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        model.train()
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device)  # metrics stay on the device; read once per epoch
        n_correct = torch.zeros((), device=device, dtype=torch.long)
        kl_sum = torch.zeros((), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        seen = 0
        for i, (x, y) in enumerate(data.batches(ds["train_x"], ds["train_y"], args.batch_size, shuffle=True,
                                                augment=ds["augment"], seed=epoch_seed, rank=rank, world=world,
                                                max_batches=args.max_batches, memory_format=mem)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                # inner max: PGD on CE, network in eval mode (the released code)
                fast.eval()
                x_adv = mart_attack(fast, x, y, eps, alpha, args.steps) if eps > 0 else x
                fast.train()
                # outer min, train mode: clean forward, then adversarial forward, gradients through both
                logits_clean = fast(x)
                logits = train_model(x_adv)
                loss = mart_loss(logits, logits_clean, y, args.beta)
            # The attack took input gradients only, so no stale parameter gradient exists here.
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            kl_sum += mart_weighted_kl(logits.detach(), logits_clean.detach(), y) * len(y)
            wa.after_step(avg, model, args.wa_mode)
            loss_sum += loss.detach() * len(y)
            n_correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if main_rank:
                utils.progress(i + 1, nb, t0, f"epoch {epoch + 1}")
        # the epoch's metrics, summed over ranks: the one host sync of the epoch (it waits for the GPU)
        loss_sum, n_correct, kl_sum, seen = utils.reduce_sum(loss_sum, n_correct, kl_sum, seen, device=device)
        train_time = time.time() - t0
        sched.step()

        # ---- weight averaging at the end of the epoch (SWA update + BatchNorm recomputation)
        wa_ready = wa.after_epoch(avg, model, args.wa_mode, epoch, wa_start, utils.bn_batches(ds, args, mem, model))
        # BatchNorm statistics drift apart per rank within an epoch: every rank keeps rank 0's
        utils.broadcast_buffers(model, avg.module if avg is not None else None)
        if not main_rank:
            continue

        # ---- validation (as Rice et al.: keep the checkpoint with the best held-out PGD accuracy; the released
        # script keeps every epoch's weights and chooses none)
        val_clean, val_pgd = utils.validate(model, ds, eps, alpha, args.val_steps)
        wa_clean, wa_pgd = utils.validate(avg.module, ds, eps, alpha, args.val_steps) if wa_ready else (None, None)
        rec = utils.tidy(dict(epoch=epoch + 1, lr=lr, train_loss=loss_sum / seen, train_acc=100 * n_correct / seen,
                              train_kl=kl_sum / seen,
                              val_clean=val_clean, val_pgd=val_pgd, wa_val_clean=wa_clean, wa_val_pgd=wa_pgd,
                              time=time.time() - t0, train_time=train_time, img_per_s=seen / train_time))
        utils.log_epoch(args.out, rec)

        # ---- checkpoints, each written atomically: best.pt / wa_best.pt when validation improves, then last.pt
        info = utils.meta(args, "mart", ds, epoch + 1, rec)
        best, wa_best = utils.save_epoch(args, info, model, opt, sched, avg, best, wa_best)
    if args.bench:
        if main_rank:  # forward-equivalents per image: PGD steps 2 each, two training passes 3 each
            utils.bench_report(args, model, ds, rec, world, passes=2 * args.steps * (eps > 0) + 6)
        shutil.rmtree(args.out, ignore_errors=True)
    utils.distributed_cleanup()
    return model, avg


if __name__ == "__main__":
    utils.cli(main)
