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
WRN-34-10 (--arch wrn34_10), PreActResNet-18 is the default here. SAR+WA uses --wa (SWA from the first milestone).
--sar-lambda 0 is the SAR authors' own AT baseline (eval-mode attack, this schedule); with --wa it is their AT+SWA,
for which --wa-bn adversarial matters (its training forwards then see only adversarial batches: see wa.py).

    python sar.py                                  # CIFAR-10, the paper's schedule
    python sar.py --dataset cifar100 --wa          # SAR + WA
    python sar.py --arch wrn34_10 --wa             # the paper's network
    torchrun --nproc_per_node=4 sar.py --amp       # 4 GPUs; the DFT still runs over the global batch
"""
import argparse

import torch
import torch.nn.functional as F

import attacks
import data
import utils
import wa
from attacks import pgd


def sar_loss(logits_adv, logits_clean, fft="batch_class"):
    """mean | view_as_real(F(Z' - Z)) |, F the unnormalised DFT of the B x C logits over both axes
    (fft="batch_class") or over the class axis per sample (fft="class"). Always float32, also under autocast.
    Gradients flow into both arguments."""
    if fft not in ("batch_class", "class"):
        raise ValueError(f"fft={fft!r}: use 'batch_class' (the 2-D DFT) or 'class' (per sample)")
    with torch.autocast(logits_adv.device.type, enabled=False):
        diff = logits_adv.float() - logits_clean.float()
        spectrum = torch.fft.fft2(diff) if fft == "batch_class" else torch.fft.fft(diff, dim=1)
        return torch.view_as_real(spectrum).abs().mean()


def sar_objective(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, lam=0.1, fft="batch_class", noise=None,
                  gather=None):
    """SAR's loss on one batch, as the authors' released code: x' = PGD-`steps` (random start) with the network in
    eval mode, then two train-mode forwards, CE(Z', y) + lam * sar_loss(Z', Z). `noise`: the U(0, 1) draw of the
    random start (default: drawn here). `gather` (several processes): concatenates a per-process tensor over the
    global batch with autograd, so that the DFT's batch axis is the global batch. Returns (loss, adversarial
    logits, the SAR term detached); lam 0 skips the clean forward (plain AT with an eval-mode attack). The caller
    owns zero_grad, backward and the optimiser step."""
    model.eval()
    x_adv = pgd(model, x, y, eps, alpha, steps, random_start=True, noise=noise) if eps > 0 else x
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
    return loss, logits_adv, reg.detach()


def get_args(argv=None):
    p = argparse.ArgumentParser(description="SAR: PGD-AT + spectral alignment regularisation (Huang et al. 2023)")
    utils.train_flags(p, "sar", epochs=100, milestones=[75, 90], val_steps=20, val_size=5000, wa_mode="swa")
    p.add_argument("--sar-lambda", type=float, default=0.1, help="weight of the spectral alignment term")
    p.add_argument("--sar-start-epoch", type=int, default=0, help="first epoch (0-based) with the term on")
    p.add_argument("--sar-fft", default="batch_class", choices=["batch_class", "class"],
                   help="2-D DFT over batch and class axes (authors' code), or 1-D over classes per sample")
    args = utils.parse_train_args(p, argv, "sar")
    utils.require(args.sar_lambda >= 0, f"--sar-lambda {args.sar_lambda:g}: use a weight >= 0")
    utils.require(args.sar_start_epoch >= 0, f"--sar-start-epoch {args.sar_start_epoch}: use an epoch >= 0")
    if args.bench:
        args.sar_start_epoch = 0  # measure the method with its term on
    return args


def main(argv=None):
    args = get_args(argv)
    device, rank, world = utils.distributed_setup(args.device, args.timeout)  # world > 1 under torchrun
    utils.require(args.batch_size >= world, f"--batch-size {args.batch_size} is smaller than the {world} processes")
    ck = utils.start_run(args, "sar", rank == 0)  # the output folder: writable, never clobbered, resumed exactly
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ds = data.load(args.dataset, args.data_dir, args.val_size, device, pad_mode=args.pad_mode, rotate=args.rotate)
    # model: the weights (optimised, averaged, saved); net: the same network as the step calls it (utils.build)
    model, net, opt, avg = utils.build(args, ds, device, world)
    start, best = utils.resume(ck, args, model, opt, avg, rank == 0)
    if rank == 0:
        train = attacks.describe("pgd", args.eps, args.steps, args.alpha) if args.eps > 0 else \
            "natural training (no attack)"
        print(f"sar.py: {args.arch} on {args.dataset} ({len(ds['train_x'])} train / {len(ds['val_x'])} val), "
              f"{device} x {world}, train {train}, validation {utils.describe_validation(args)}, amp={args.amp}, "
              f"compile={args.compile}, wa={utils.describe_wa(args)}, SAR lambda {args.sar_lambda} "
              f"({args.sar_fft}) from epoch {args.sar_start_epoch + 1}", flush=True)

    for epoch in range(start, args.epochs):
        net.train()
        sums, t0 = utils.start_epoch(device)
        lr = utils.set_lr(opt, args, epoch)  # the released code: x0.1 from 0-based epoch 75 and 90
        lam = args.sar_lambda if epoch >= args.sar_start_epoch else 0.0  # before it: plain AT, no clean forward
        for x, y, noise, gather in utils.train_batches(ds, args, epoch, rank, world, noise="uniform"):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss, logits, reg = sar_objective(net, x, y, args.eps, args.alpha, args.steps, lam, args.sar_fft,
                                                  noise, gather)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            wa.after_step(avg, model, args.wa_mode)
            utils.tally(sums, y, loss, logits, **({"sar": reg} if lam > 0 else {}))
        best = utils.end_epoch(args, "sar", epoch, ds, model, avg, opt, best, sums, t0, lr, train_sar=None)
    # --bench's forward-equivalents per image: PGD steps 2 each, the two training passes 3 each
    utils.finish(args, "sar", model, ds, world, passes=2 * args.steps * (args.eps > 0) + 3 + 3 * (args.sar_lambda > 0))
    return model, avg


if __name__ == "__main__":
    utils.cli(main)
