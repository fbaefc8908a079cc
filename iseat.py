"""ISEAT: instance-adaptive smoothness enhanced adversarial training.

Li and Spratling, "Improved adversarial training through adaptive instance-wise loss smoothing" (2023):
PGD-AT + adversarial weight perturbation (AWP, Wu et al. 2020) + an instance-weighted logit-pairing term,

    L = mean_i CE(f_{theta+gamma v}(x'_i), y_i) + (lambda/B) sum_i w_i || f_{theta+gamma v}(x'_i) - f_theta(x_i) ||^2

x' = PGD-10 without random start (train mode); v the AWP direction, per weight kernel l (the parameters with 2 or
more dimensions whose name holds "weight": conv and linear kernels, not BatchNorm, not biases, as the released AWP
code selects them): v_l = ||theta_l|| d_l / (||d_l|| + 1e-20), d_l the change of theta_l after one plain SGD step (lr
eta = 0.01) of a proxy copy on minus the adversarial CE; gamma = 7e-3. w_i = j/B for the sample at position j of the
vulnerabilities av_i = CE_adv_i - CE_clean_i sorted ascending (the most vulnerable gets 1). The clean branch's
gradient is taken at theta, the adversarial branch's at theta + gamma v, and the two are added; the optimiser steps
at the perturbed point and the perturbation is then removed (as in the authors' AWP code). With SGD this differs
from a step at theta only through the weight decay, which sees theta + gamma v (and the momentum buffer carries
that on): the gradient itself was taken before the step. lambda is set per lr stage: 0 before the first milestone,
0.1 after (--lam 0 0.1), so the first stage is exactly AT-AWP.
Where the code differs in form, not in result, from the authors': the adversarial forward at theta + gamma v is
taken out of place (torch.func.functional_call), so the clean forward at theta serves as the unperturbed branch:
no copy of the model is made per batch and no third forward is needed. The proxy's step is taken the same way: the
proxy's forward is the network's own, at theta, with copies of the BatchNorm statistics (whose update, as the
proxy's, is thrown away), and d_l = eta * grad_l CE. While lambda is 0 the clean forward is skipped (its only effect
would be on BatchNorm's running statistics), so that stage is exactly AT-AWP.
Under torchrun the rank weights are the ranks within the global batch (the vulnerabilities and logit distances of
every process are gathered) and the proxy's gradient is that of the global batch: the method does not depend on
the number of processes.
Ablations: --awp-gamma 0 --lam 0 is PGD-AT without random start; --lam 0 is AT-AWP with ISEAT's gamma, and
--lam 0 --awp-gamma 0.01 --random-start is AT-AWP as Wu et al. ran it.

    python iseat.py                      # PreActResNet-18, CIFAR-10, 200 epochs, lr x0.1 at 100 and 150
    python iseat.py --arch wrn34_10      # the authors' README configuration
    torchrun --nproc_per_node=4 iseat.py --amp   # 4 GPUs (ranks and AWP direction of the global batch)
"""
import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call

import attacks
import data
import utils
import wa
from attacks import pgd


def rank_weights(av):
    """Sort av ascending (stable: ties keep their batch order); the sample at position j = 1..B gets j / B."""
    B = len(av)
    w = torch.empty(B, device=av.device)
    w[torch.sort(av, stable=True).indices] = torch.arange(1, B + 1, device=av.device, dtype=torch.float) / B
    return w


def awp_direction(model, x_adv, y, eta=0.01, average=None):
    """AWP direction {name: ||theta_l|| d_l / (||d_l|| + 1e-20)}, d_l the change of each weight kernel after one plain
    SGD step (lr eta, no momentum, no weight decay) of a proxy copy on minus its mean adversarial CE: d_l = eta *
    grad_l CE. The proxy's forward is the network's own at theta in train mode, with copies of the BatchNorm buffers
    (the proxy's statistics update is thrown away). `average` (several processes): the mean of the gradients over
    processes, so the direction is the global batch's."""
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.dim() >= 2 and "weight" in n]  # the released AWP code's choice
    proxy_state = {**params, **{n: b.clone() for n, b in model.named_buffers()}}
    ce = F.cross_entropy(functional_call(model, proxy_state, (x_adv,)).float(), y)
    grads = list(torch.autograd.grad(ce, [params[n] for n in names]))
    if average is not None:
        grads = average(grads)
    with torch.no_grad():
        return {n: params[n].norm() * (eta * g) / ((eta * g).norm() + 1e-20) for n, g in zip(names, grads)}


@contextlib.contextmanager
def awp_perturbed(model, v, gamma):
    """theta_l += gamma v_l inside the block (wrap the optimiser step in it); theta_l -= gamma v_l after, written as
    saved + (theta_l - (saved + gamma v_l)): it keeps the update made at the perturbed point, and gives back the saved
    weights bitwise when there was none. `model`: the network passed to iseat_objective (the names of v are its)."""
    own, saved = dict(model.named_parameters()), {}
    with torch.no_grad():
        for n, d in v.items():
            saved[n] = own[n].detach().clone()
            own[n].add_(d, alpha=gamma)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, d in v.items():
                own[n].copy_(saved[n] + (own[n] - saved[n].add(d, alpha=gamma)))


def iseat_objective(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, gamma=7e-3, eta=0.01, lam=0.1,
                    random_start=False, noise=None, gather=None, average=None):
    """ISEAT's loss on one batch, the network in train mode throughout. Returns (loss, adversarial logits, the
    weighted smoothing term detached, v): take the optimiser step inside `with awp_perturbed(model, v, gamma):`, so
    that it is made at theta + gamma v and the perturbation is removed after it. `noise`: the U(0, 1) draw of the
    random start (with random_start). Several processes: `gather` concatenates a per-process tensor over the global
    batch with autograd (rank weights over the global batch), `average` averages the proxy's gradients."""
    # 1. clean forward at theta: the unperturbed branch of the smoothing term and CE_clean
    logits_clean = model(x) if lam > 0 else None
    # 2. PGD-`steps` without random start (random_start: Wu et al.'s AWP), network in train mode
    x_adv = pgd(model, x, y, eps, alpha, steps, random_start=random_start, noise=noise) if eps > 0 else x
    # 3. AWP direction from one ascent step of the proxy
    v = awp_direction(model, x_adv, y, eta, average) if gamma > 0 else {}
    # 4. adversarial forward at theta + gamma v, out of place so that the clean graph at theta stays valid
    params = {n: p + gamma * v[n] if n in v else p for n, p in model.named_parameters()}
    logits_adv = functional_call(model, params, (x_adv,))
    ce_adv = F.cross_entropy(logits_adv.float(), y, reduction="none")
    loss = ce_adv.mean()
    reg = torch.zeros((), device=x.device)
    if lam > 0:
        ce_clean = F.cross_entropy(logits_clean.float(), y, reduction="none")
        # 5. rank weights from the vulnerability CE_adv - CE_clean (detached), recomputed every batch
        av = (ce_adv - ce_clean).detach()
        # 6. weighted squared L2 between adversarial (theta + gamma v) and clean (theta) logits, both with gradients
        dist2 = (logits_adv.float() - logits_clean.float()).pow(2).sum(1)
        if gather is not None:
            av, dist2 = gather(av), gather(dist2)
        reg = (rank_weights(av) * dist2).sum() / len(dist2)
        loss = loss + lam * reg
    return loss, logits_adv, reg.detach(), v


def get_args(argv=None):
    p = argparse.ArgumentParser(description="ISEAT: AWP + instance-adaptive logit smoothing (Li and Spratling 2023)")
    utils.train_flags(p, "iseat", epochs=200, milestones=[100, 150], val_steps=10, val_size=1000)
    p.add_argument("--awp-gamma", type=float, default=7e-3, help="size of the weight perturbation (0: no AWP)")
    p.add_argument("--awp-eta", type=float, default=0.01, help="lr of the proxy's ascent step")
    p.add_argument("--random-start", action="store_true",
                   help="start the training PGD at a random point of the ball (Wu et al.'s AWP; ISEAT does not)")
    p.add_argument("--lam", type=float, nargs="+", default=[0.0, 0.1],
                   help="lambda per lr stage (before the first milestone, after it, ...); the last value repeats")
    args = utils.parse_train_args(p, argv, "iseat")
    utils.require(args.awp_gamma >= 0, f"--awp-gamma {args.awp_gamma:g}: use a size >= 0 (0: no AWP)")
    utils.require(args.awp_eta > 0, f"--awp-eta {args.awp_eta:g}: use a positive proxy step")
    utils.require(all(v >= 0 for v in args.lam), f"--lam {' '.join(map(str, args.lam))}: use weights >= 0")
    if args.bench:
        args.lam = [max(args.lam)]  # measure the method with its smoothing term on
    return args


def main(argv=None):
    args = get_args(argv)
    device, rank, world = utils.distributed_setup(args.device, args.timeout)  # world > 1 under torchrun
    utils.require(args.batch_size >= world, f"--batch-size {args.batch_size} is smaller than the {world} processes")
    ck = utils.start_run(args, "iseat", rank == 0)  # the output folder: writable, never clobbered, resumed exactly
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate)
    # model: the weights (optimised, averaged, saved); net: the same network as the step calls it (utils.build)
    model, net, opt, avg = utils.build(args, ds, device, world)
    start, best = utils.resume(ck, args, model, opt, avg, rank == 0)
    average = utils.average_over_ranks if world > 1 else None
    if rank == 0:
        train = attacks.describe("pgd", args.eps, args.steps, args.alpha) if args.eps > 0 else \
            "natural training (no attack)"
        if not args.random_start:
            train = train.replace("random start", "no random start")
        print(f"iseat.py: {args.arch} on {args.dataset} ({len(ds['train_x'])} train / {len(ds['val_x'])} val), "
              f"{device} x {world}, train {train}, validation {utils.describe_validation(args)}, amp={args.amp}, "
              f"compile={args.compile}, wa={utils.describe_wa(args)}, AWP gamma {args.awp_gamma:g}, "
              f"lambda per lr stage {args.lam}", flush=True)

    for epoch in range(start, args.epochs):
        net.train()
        sums, t0 = utils.start_epoch(device)
        lr = utils.set_lr(opt, args, epoch)  # the released code: x0.1 from 0-based epoch 100 and 150
        stage = sum(epoch >= m for m in args.milestones)  # lambda is set per lr stage
        lam = args.lam[min(stage, len(args.lam) - 1)]
        noise_kind = "uniform" if args.random_start else None
        for x, y, noise, gather in utils.train_batches(ds, args, epoch, rank, world, noise=noise_kind):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss, logits, reg, v = iseat_objective(net, x, y, args.eps, args.alpha, args.steps, args.awp_gamma,
                                                       args.awp_eta, lam, args.random_start, noise, gather, average)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            with awp_perturbed(net, v, args.awp_gamma):  # the step at theta + gamma v, then back
                opt.step()
            wa.after_step(avg, model, args.wa_mode)
            utils.tally(sums, y, loss, logits, **({"smooth": reg} if lam > 0 else {}))
        best = utils.end_epoch(args, "iseat", epoch, ds, model, avg, opt, best, sums, t0, lr, lam=lam,
                               train_smooth=None)
    # --bench's forward-equivalents per image: PGD steps 2 each; adversarial, clean and proxy passes 3 each
    passes = 2 * args.steps * (args.eps > 0) + 3 + 3 * (max(args.lam) > 0) + 3 * (args.awp_gamma > 0)
    utils.finish(args, "iseat", model, ds, world, passes)
    return model, avg


if __name__ == "__main__":
    utils.cli(main)
