"""Weight averaging (`--wa` on every method), on torch.optim.swa_utils.AveragedModel.

swa  the SAR paper's WA: an equal running average of the end-of-epoch weights from the first lr milestone on,
     avg <- avg + (w - avg) / (n + 1); parameters only, and after each update the averaged model's BatchNorm
     statistics are recomputed with one pass over the clean training images (update_bn). A model trained only on
     adversarial batches (PGD-AT) was trained with adversarial statistics: --wa-bn adversarial recomputes them on
     PGD examples instead (on Fashion-MNIST this kept the average's PGD accuracy at the raw model's, 57.8 against
     58.8 %, where the clean pass gave 48.6 %; SAR, whose training forwards see both kinds of batch, showed no
     difference).
ema  Gowal et al. 2020 / Rebuffi et al. 2021: after every optimiser step avg <- d * avg + (1 - d) * w with
     d = 0.999 (with --wa-warmup: d_t = min(d, (1 + t) / (10 + t)), t = updates so far); BatchNorm buffers too.
wang2023  the EMA of Wang et al. 2023's release (--recipe wang2023): after the optimiser step t (counted from 1 over
     the whole run) d_t = 0 while t < W (the average is the live model), then min(d, (1 + t - W) / (10 + t - W)),
     W = 0.025 x epochs x (floor(N / B) + 1), N the data set's full training set (data.TRAIN_IMAGES); the
     parameters only, d = 0.995; BatchNorm's statistics are the live model's.
The method files call AveragedModel's own update_parameters (EMA: after every optimiser step; SWA: at the end of
each epoch from the first milestone, then update_bn below) and save avg.module.state_dict() (no `module.` prefix, no
n_averaged) with n_averaged beside it.
"""
import math

import torch
from torch.optim import swa_utils

import attacks
import data


def averaged(model, mode, decay=0.999, warmup=False, release_warmup=0.0):
    """The weight average of `model`: swa (equal average of the parameters; BatchNorm buffers left to update_bn), ema
    (decay d, optionally warmed up as min(d, (1 + t) / (10 + t)); BatchNorm buffers averaged too) or wang2023 (the
    release of Wang et al. 2023: the parameters only, decay 0, the live weights, for the first `release_warmup`
    optimiser steps, then min(d, (1 + s) / (10 + s)), s the steps since; BatchNorm buffers the live model's)."""
    if mode == "swa":
        return swa_utils.AveragedModel(model)
    if mode == "wang2023":
        @torch.no_grad()
        def delayed(avg_params, params, n):  # n: the optimiser steps taken, this one included (the release's count)
            s = n.double() - release_warmup
            d = torch.where(s < 0, 0.0, ((1 + s) / (10 + s)).clamp(max=decay))  # on the device: no host sync
            for a, p in zip(avg_params, params):
                a.lerp_(p, (1 - d).to(a.dtype))
        avg = swa_utils.AveragedModel(model, multi_avg_fn=delayed)  # the buffers: copied from the model every update
        avg.n_averaged.fill_(1)  # so every update, the first too, applies the formula to the initial weights' copy
        return avg

    @torch.no_grad()
    def warmed_up(avg_params, params, n):
        d = ((1 + n) / (10 + n)).clamp(max=decay).float()
        for a, p in zip(avg_params, params):
            if torch.is_floating_point(a):
                a.lerp_(p, (1 - d).to(a.dtype))
            else:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
                a.copy_(p)
    fn = warmed_up if warmup else swa_utils.get_ema_multi_avg_fn(decay)
    return swa_utils.AveragedModel(model, multi_avg_fn=fn, use_buffers=True)


def describe(mode, decay, warmup, start, bn, release_warmup=0.0):
    """The weight average in words, for the run's first line (mode None or False: off)."""
    if not mode:
        return "off"
    if mode == "wang2023":
        return (f"wang2023 (EMA of the parameters after every step: the live weights for the first {release_warmup:g} "
                f"steps, then decay min({decay:g}, (1 + s) / (10 + s)); BatchNorm statistics the live model's)")
    if mode == "swa":
        after = ", the first after an lr decay" if start else ""
        return (f"swa (equal average of the end-of-epoch weights from epoch {start + 1}{after}; BatchNorm recomputed "
                f"on {bn} images)")
    return f"ema (decay {decay:g} after every step{', warmed up' if warmup else ''})"


def update_bn(avg, ds, model, n, memory_format, rank=0, world=1, attack=None):
    """SWA's BatchNorm pass, torch's update_bn over n training images (what an epoch trains on) in batches of 512
    (augmented as the training's; 512 keeps the pass a few large batches). `attack`, a dict of attacks.pgd's eps,
    alpha, steps and norm: PGD examples instead (random start), crafted against `model` in eval mode, the statistics a
    model trained on adversarial batches only (PGD-AT) was trained with. world > 1 (--sync-bn): this process passes
    its share of every batch."""
    attack = attack if attack and attack["eps"] > 0 else None
    noise = None if attack is None else data.uniform if attack["norm"] == "Linf" else data.unit_ball

    def batches():
        for x, y, z in data.batches(ds["train_x"], ds["train_y"], 512, shuffle=True, augment=ds["augment"], rank=rank,
                                    world=world, max_batches=math.ceil(n / 512), memory_format=memory_format,
                                    noise=noise):
            if attack is not None:
                with attacks.frozen(model), torch.enable_grad():  # update_bn runs under no_grad
                    x = attacks.pgd(model, x, y, **attack, random_start=True, noise=z)
            yield x, y
    swa_utils.update_bn(batches(), avg.module)
