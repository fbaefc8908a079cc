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

    python trades.py                               # PreActResNet-18, CIFAR-10
    python trades.py --arch wrn34_10 --released    # the released script's network and settings
    python trades.py --beta 1                      # the paper's other operating point
"""
import argparse

import torch
import torch.nn.functional as F

import attacks
import data
import utils
import wa


def trades_kl(logits_adv, logits_clean):
    """(1/B) sum_i KL( softmax z_i || softmax z'_i ) = (1/B) sum_i sum_c p_ic (log p_ic - log p'_ic), in float32,
    with gradients into both arguments (KLDivLoss(reduction="sum") of the released code, divided by B)."""
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    p_clean = F.softmax(logits_clean.float(), dim=1)
    return F.kl_div(log_p_adv, p_clean, reduction="sum") / len(logits_adv)


def trades_loss(logits_adv, logits_clean, y, beta=6.0):
    """CE(f(x), y) + beta * (1/B) sum_i KL( softmax f(x_i) || softmax f(x'_i) )."""
    return F.cross_entropy(logits_clean.float(), y) + beta * trades_kl(logits_adv, logits_clean)


def trades_attack(model, x, eps, alpha, steps, noise=None):
    """PGD on the KL to the clean prediction (no labels), from x + 0.001 N(0, I) (`noise`: the N(0, I) draw; default:
    drawn here), with the network in eval mode whatever mode it was given in (restored after, so BatchNorm's running
    statistics are never touched); input gradients only."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), dim=1)
    x_adv = x + 0.001 * (torch.randn_like(x) if noise is None else noise)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_clean, reduction="sum")
        (g,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv.clamp(0, 1).detach()


def trades_objective(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, beta=6.0, noise=None):
    """TRADES' loss on one batch, as the released trades_loss: the KL attack in eval mode, then in train mode one
    clean and one adversarial forward, CE(f(x), y) + beta * KL, gradients through both. `noise`: the N(0, I) draw of
    the start (default: drawn here). Returns (loss, adversarial logits, the KL term detached); the caller owns
    zero_grad, backward and the optimiser step."""
    x_adv = trades_attack(model, x, eps, alpha, steps, noise) if eps > 0 else x
    model.train()
    logits_clean = model(x)  # feeds the CE and the KL target
    logits_adv = model(x_adv)
    loss = trades_loss(logits_adv, logits_clean, y, beta)
    return loss, logits_adv, trades_kl(logits_adv.detach(), logits_clean.detach())


def get_args(argv=None):
    p = argparse.ArgumentParser(description="TRADES (Zhang et al. 2019), as the authors' released code defines it")
    utils.train_flags(p, "trades", epochs=100, milestones=[75, 90], val_steps=10, val_size=1000)
    p.add_argument("--beta", type=float, default=6.0, help="weight of the KL term")
    p.add_argument("--released", action="store_true",
                   help="the released script's settings: eps 0.031, step 0.007, weight decay 2e-4, 76 epochs, "
                        "lr x0.1 from its epoch 75 (--milestones 74 89 99) (flags given explicitly still win)")
    known, _ = p.parse_known_args(argv)
    if known.released:  # the released script's defaults; flags given on the command line still win
        p.set_defaults(eps=0.031, alpha=0.007, wd=2e-4, epochs=76, milestones=[74, 89, 99])
    args = utils.parse_train_args(p, argv, "trades")
    utils.require(args.beta >= 0, f"--beta {args.beta:g}: use a weight >= 0")
    return args


def main(argv=None):
    args = get_args(argv)
    device, rank, world = utils.distributed_setup(args.device, args.timeout)  # world > 1 under torchrun
    utils.require(args.batch_size >= world, f"--batch-size {args.batch_size} is smaller than the {world} processes")
    ck = utils.start_run(args, "trades", rank == 0)  # the output folder: writable, never clobbered, resumed exactly
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate)
    # model: the weights (optimised, averaged, saved); net: the same network as the step calls it (utils.build)
    model, net, opt, avg = utils.build(args, ds, device, world)
    start, best = utils.resume(ck, args, model, opt, avg, rank == 0)
    if rank == 0:
        train = (f"PGD-{args.steps} on KL(f(x) || f(x')) (Linf, eps {attacks.radius(args.eps)}, step "
                 f"{attacks.radius(args.alpha)}, start x + 0.001 N(0, I), eval mode)" if args.eps > 0
                 else "natural training (no attack)")
        print(f"trades.py: {args.arch} on {args.dataset} ({len(ds['train_x'])} train / {len(ds['val_x'])} val), "
              f"{device} x {world}, train {train}, validation {utils.describe_validation(args)}, amp={args.amp}, "
              f"compile={args.compile}, wa={utils.describe_wa(args)}, beta {args.beta:g}", flush=True)

    for epoch in range(start, args.epochs):
        net.train()
        sums, t0 = utils.start_epoch(device)
        lr = utils.set_lr(opt, args, epoch)
        for x, y, noise, _ in utils.train_batches(ds, args, epoch, rank, world, noise="normal"):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss, logits, kl = trades_objective(net, x, y, args.eps, args.alpha, args.steps, args.beta, noise)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            wa.after_step(avg, model, args.wa_mode)
            utils.tally(sums, y, loss, logits, kl=kl)
        best = utils.end_epoch(args, "trades", epoch, ds, model, avg, opt, best, sums, t0, lr)
    # --bench's forward-equivalents per image: PGD steps 2 each + the clean target 1; two training passes 3 each
    utils.finish(args, "trades", model, ds, world, passes=(2 * args.steps + 1) * (args.eps > 0) + 6)
    return model, avg


if __name__ == "__main__":
    utils.cli(main)
