"""SAR: PGD-AT + spectral alignment regularisation.

Spectral alignment regularisation, Huang, Lin, Tao and Wong (2023). The regulariser keeps
the Fourier spectrum of an adversarial batch's logits close to that of its clean batch:

    L = CE(Z', y) + lambda * mean | F(Z') - F(Z) |,     Z' = f(x'), Z = f(x),  x' = PGD-10(f, x, y)

F is the unnormalised 2-D DFT of the B x C logit matrix, the L1 taken over real and imaginary parts and averaged
over all 2*B*C numbers; lambda = 0.1. Choices that follow the authors' released code rather than the paper's text:
  - the DFT runs over both axes, batch and class (torch.fft.fft2 of the logit matrix); the per-sample DFT over the
    class axis alone is offered as --sar-fft class (its scale is ~12x smaller: retune lambda);
  - the PGD attack runs with the network in eval mode, training forwards in train mode; two separate forwards
    (BatchNorm sees each batch alone), gradients through both, no clean CE term;
  - --sar-start-epoch (default 0; the released code used 75, the first lr decay);
  - best.pt is chosen on validation PGD-20 (--val-steps 20), the released code's main criterion.
Schedule of the paper: 100 epochs, lr x0.1 at 75 and 90, 5,000 validation images; the paper's network is
WRN-34-10 (--arch wrn34_10), PreActResNet-18 is the default here. SAR+WA uses --wa (SWA from the first milestone).
--sar-lambda 0 is the SAR authors' own AT baseline (eval-mode attack, this schedule); with --wa it is their AT+SWA,
for which --wa-bn adversarial matters (its training forwards then see only adversarial batches: see wa.py).

    python sar.py                                  # CIFAR-10, the paper's schedule
    python sar.py --dataset cifar100 --wa          # SAR + WA
    python sar.py --arch wrn34_10 --wa             # the paper's network
    torchrun --nproc_per_node=4 sar.py --amp       # 4 GPUs; the batch-axis DFT runs over each rank's local batch
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
    p = argparse.ArgumentParser(description="SAR: PGD-AT + spectral alignment regularisation (Huang et al. 2023)")
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
    p.add_argument("--val-steps", type=int, default=20, help="PGD steps of validation (the released code: 20)")
    p.add_argument("--val-size", type=int, default=5000, help="held-out training images for choosing best.pt")
    p.add_argument("--pad-mode", default="zero", choices=["zero", "reflect"], help="padding of the random crop")
    p.add_argument("--rotate", type=float, default=0.0, help="random rotation, max degrees (Rice's CIFAR-100: 15)")
    p.add_argument("--wa", action="store_true", help="keep a weight average (see wa.py) and validate it too")
    p.add_argument("--wa-mode", default="swa", choices=["ema", "swa"])
    p.add_argument("--wa-decay", type=float, default=0.999)
    p.add_argument("--wa-warmup", action="store_true", help="EMA decay min(d, (1+t)/(10+t))")
    p.add_argument("--wa-bn", default="clean", choices=["clean", "adversarial"],
                   help="images of SWA's BatchNorm recomputation (adversarial: PGD examples, for PGD-AT)")
    p.add_argument("--sar-lambda", type=float, default=0.1, help="weight of the spectral alignment term")
    p.add_argument("--sar-start-epoch", type=int, default=0, help="first epoch (0-based) with the term on")
    p.add_argument("--sar-fft", default="batch_class", choices=["batch_class", "class"],
                   help="2-D DFT over batch and class axes (authors' code), or 1-D over classes per sample")
    p.add_argument("--out", default=None, help="output folder (default runs/sar-DATASET-ARCH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (evaluation stays fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training and attacks")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batches", type=int, default=None, help="stop each epoch after this many batches")
    p.add_argument("--bench", action="store_true",
                   help="measure images/s: 2 epochs of --max-batches (20) batches, no validation, nothing kept")
    args = utils.parse_args(p, argv)
    args.out = args.out or os.path.join("runs", f"sar-{args.dataset}-{args.arch}")
    utils.check_train_args(args)
    utils.require(args.sar_lambda >= 0, f"--sar-lambda {args.sar_lambda:g}: use a weight >= 0")
    utils.require(args.sar_start_epoch >= 0, f"--sar-start-epoch {args.sar_start_epoch}: use an epoch >= 0")
    if args.bench:
        utils.bench_settings(args)
        args.sar_start_epoch = 0  # measure the method with its term on
    return args


def sar_loss(logits_adv, logits_clean, fft="batch_class"):
    """mean | view_as_real(F(Z')) - view_as_real(F(Z)) |, F the unnormalised DFT of the B x C logits over both axes
    (fft="batch_class") or over the class axis per sample (fft="class"). Always float32, also under autocast.
    Gradients flow into both arguments."""
    with torch.autocast(logits_adv.device.type, enabled=False):
        dft = torch.fft.fft2 if fft == "batch_class" else (lambda z: torch.fft.fft(z, dim=1))
        diff = torch.view_as_real(dft(logits_adv.float())) - torch.view_as_real(dft(logits_clean.float()))
        return diff.abs().mean()


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
    ck = utils.start_run(args, "sar", main_rank)

    # ---- data: uint8 tensors on the device; a fixed-seed validation split of the training set
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate)
    n_train = len(ds["train_x"])
    nb = data.num_batches(n_train, args.batch_size, args.max_batches)

    # ---- model, optimiser, schedule (piecewise x0.1 at the milestones, stepped once per epoch)
    model = models.get_model(args.arch, ds["num_classes"], ds["channels"]).to(device, memory_format=mem)
    fast = torch.compile(model) if args.compile else model  # used for the attack and the training forward
    # Several processes: the adversarial forward goes through DDP, which averages gradients across ranks in
    # backward; the attack and the clean forward run on the plain module (one DDP forward per backward).
    train_model = torch.nn.parallel.DistributedDataParallel(fast) if world > 1 else fast
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, gamma=0.1)
    avg = wa.averaged(model, args.wa_mode, args.wa_decay, args.wa_warmup) if args.wa else None
    wa_start = args.milestones[0] if args.milestones else 0  # SWA averages from the first lr decay on

    # ---- resume: everything needed to continue exactly is in last.pt
    start_epoch, best, wa_best = utils.resume(ck, args, model, opt, sched, avg, main_rank)
    train_attack = attacks.describe("pgd", eps, args.steps, alpha) if eps > 0 else "natural training (no attack)"
    if main_rank:
        print(f"sar.py: {args.arch} on {args.dataset} ({n_train} train / {len(ds['val_x'])} val), "
              f"{device} x {world}, "
              f"train {train_attack}, validation {'clean' if eps == 0 else f'clean + PGD-{args.val_steps}'}, "
              f"amp={args.amp}, compile={args.compile}, wa={utils.describe_wa(args)}, SAR lambda {args.sar_lambda} "
              f"({args.sar_fft}) from epoch {args.sar_start_epoch + 1}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness (order, crops, PGD starts) is a function of (seed, epoch): a resumed run repeats it
        epoch_seed = args.seed * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        model.train()
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=device)  # metrics stay on the device; read once per epoch
        n_correct = torch.zeros((), device=device, dtype=torch.long)
        sar_sum = torch.zeros((), device=device)
        sar_on = args.sar_lambda > 0 and epoch >= args.sar_start_epoch
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        seen = 0
        for i, (x, y) in enumerate(data.batches(ds["train_x"], ds["train_y"], args.batch_size, shuffle=True,
                                                augment=ds["augment"], seed=epoch_seed, rank=rank, world=world,
                                                max_batches=args.max_batches, memory_format=mem)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                # inner max: PGD-10 with random start, network in eval mode (the authors' code)
                fast.eval()
                x_adv = attacks.pgd(fast, x, y, eps, alpha, args.steps, random_start=True) if eps > 0 else x
                fast.train()
                # two train-mode forwards; the clean logits are no detached target: gradients flow through both
                logits = train_model(x_adv)
                loss = F.cross_entropy(logits.float(), y)
                if sar_on:  # before --sar-start-epoch this is plain PGD-AT and the clean forward is skipped
                    reg = sar_loss(logits, fast(x), args.sar_fft)
                    loss = loss + args.sar_lambda * reg
                    sar_sum += reg.detach() * len(y)
            # The attack took input gradients only, so no stale parameter gradient exists here.
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            wa.after_step(avg, model, args.wa_mode)
            loss_sum += loss.detach() * len(y)
            n_correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if main_rank:
                utils.progress(i + 1, nb, t0, f"epoch {epoch + 1}")
        # the epoch's metrics, summed over ranks: the one host sync of the epoch (it waits for the GPU)
        loss_sum, n_correct, sar_sum, seen = utils.reduce_sum(loss_sum, n_correct, sar_sum, seen, device=device)
        train_time = time.time() - t0
        sched.step()

        # ---- weight averaging at the end of the epoch (SWA update + BatchNorm recomputation)
        wa_ready = wa.after_epoch(avg, model, args.wa_mode, epoch, wa_start, utils.bn_batches(ds, args, mem, model))
        # BatchNorm statistics drift apart per rank within an epoch: every rank keeps rank 0's
        utils.broadcast_buffers(model, avg.module if avg is not None else None)
        if not main_rank:
            continue

        # ---- validation (the released code keeps the checkpoint with the best held-out PGD-20 accuracy)
        val_clean, val_pgd = utils.validate(model, ds, eps, alpha, args.val_steps)
        wa_clean, wa_pgd = utils.validate(avg.module, ds, eps, alpha, args.val_steps) if wa_ready else (None, None)
        rec = utils.tidy(dict(epoch=epoch + 1, lr=lr, train_loss=loss_sum / seen, train_acc=100 * n_correct / seen,
                              train_sar=sar_sum / seen if sar_on else None,
                              val_clean=val_clean, val_pgd=val_pgd, wa_val_clean=wa_clean, wa_val_pgd=wa_pgd,
                              time=time.time() - t0, train_time=train_time, img_per_s=seen / train_time))
        utils.log_epoch(args.out, rec)

        # ---- checkpoints, each written atomically: best.pt / wa_best.pt when validation improves, then last.pt
        info = utils.meta(args, "sar", ds, epoch + 1, rec)
        best, wa_best = utils.save_epoch(args, info, model, opt, sched, avg, best, wa_best)
    if args.bench:
        if main_rank:  # forward-equivalents per image: PGD steps 2 each, the two training passes 3 each
            utils.bench_report(args, model, ds, rec, world, passes=2 * args.steps * (eps > 0) + 3 + 3 * sar_on)
        shutil.rmtree(args.out, ignore_errors=True)
    utils.distributed_cleanup()
    return model, avg


if __name__ == "__main__":
    utils.cli(main)
