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
"""
import argparse

import torch
import torch.nn.functional as F

import attacks
import data
import utils
import wa
from attacks import pgd


def at_objective(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, noise=None):
    """PGD-AT's loss on one batch: x' = PGD-`steps` from a random start in the eps-ball, with the network in the mode
    the caller left it in (train mode, as Rice et al.); then CE(f(x'), y). `noise`: the U(0, 1) draw of the random
    start (default: drawn here). Returns (loss, adversarial logits); the caller owns zero_grad, backward and the
    optimiser step. eps 0 is natural training (no attack)."""
    x_adv = pgd(model, x, y, eps, alpha, steps, random_start=True, noise=noise) if eps > 0 else x
    logits = model(x_adv)
    return F.cross_entropy(logits.float(), y), logits


def get_args(argv=None):
    p = argparse.ArgumentParser(description="PGD adversarial training (Madry et al. 2018; Rice et al. 2020 recipe)")
    utils.train_flags(p, "at", epochs=200, milestones=[100, 150], val_steps=10, val_size=1000)
    return utils.parse_train_args(p, argv, "at")


def main(argv=None):
    args = get_args(argv)
    device, rank, world = utils.distributed_setup(args.device, args.timeout)  # world > 1 under torchrun
    utils.require(args.batch_size >= world, f"--batch-size {args.batch_size} is smaller than the {world} processes")
    ck = utils.start_run(args, "at", rank == 0)  # the output folder: writable, never clobbered, resumed exactly
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate)
    # model: the weights (optimised, averaged, saved); net: the same network as the step calls it (utils.build)
    model, net, opt, avg = utils.build(args, ds, device, world)
    start, best = utils.resume(ck, args, model, opt, avg, rank == 0)
    nb = data.num_batches(len(ds["train_x"]), args.batch_size, args.max_batches)
    if rank == 0:
        train = attacks.describe("pgd", args.eps, args.steps, args.alpha) if args.eps > 0 else \
            "natural training (no attack)"
        print(f"at.py: {args.arch} on {args.dataset} ({len(ds['train_x'])} train / {len(ds['val_x'])} val), "
              f"{device} x {world}, train {train}, validation {utils.describe_validation(args)}, amp={args.amp}, "
              f"compile={args.compile}, wa={utils.describe_wa(args)}", flush=True)

    for epoch in range(start, args.epochs):
        net.train()
        sums, t0 = utils.start_epoch(device)
        lr = utils.set_lr(opt, args, epoch)
        for i, (x, y, noise, _) in enumerate(utils.train_batches(ds, args, epoch, rank, world, noise="uniform")):
            utils.set_lr(opt, args, epoch + (i + 1) / nb)  # Rice et al.: the lr of t = epoch + (i + 1) / batches
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss, logits = at_objective(net, x, y, args.eps, args.alpha, args.steps, noise)
            opt.zero_grad(set_to_none=False)  # the attack took input gradients only: nothing stale to clear
            loss.backward()
            opt.step()
            wa.after_step(avg, model, args.wa_mode)
            utils.tally(sums, y, loss, logits)
        best = utils.end_epoch(args, "at", epoch, ds, model, avg, opt, best, sums, t0, lr)
    # --bench's forward-equivalents per image: PGD steps 2 each (forward + input gradient), the training pass 3
    utils.finish(args, "at", model, ds, world, passes=2 * args.steps * (args.eps > 0) + 3)
    return model, avg


if __name__ == "__main__":
    utils.cli(main)
