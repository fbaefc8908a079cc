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
Save avg.module.state_dict() (no `module.` prefix, no n_averaged) and n_averaged beside it.
"""
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn


def ema_warmup_fn(decay):
    @torch.no_grad()
    def update(avg_params, params, n):
        d = ((1 + n) / (10 + n)).clamp(max=decay).float()
        for a, p in zip(avg_params, params):
            if torch.is_floating_point(a):
                a.lerp_(p, (1 - d).to(a.dtype))
            else:  # integer buffers (BatchNorm's num_batches_tracked) follow the model
                a.copy_(p)
    return update


def averaged(model, mode, decay=0.999, warmup=False):
    if mode == "swa":
        return AveragedModel(model)  # default: equal average of the parameters, buffers left to update_bn
    if mode == "ema":
        fn = ema_warmup_fn(decay) if warmup else get_ema_multi_avg_fn(decay)
        return AveragedModel(model, multi_avg_fn=fn, use_buffers=True)
    raise SystemExit(f"error: unknown --wa-mode {mode!r}; use swa or ema")


def after_step(avg, model, mode):
    """Called after every optimiser step: the EMA update."""
    if avg is not None and mode == "ema":
        avg.update_parameters(model)


def after_epoch(avg, model, mode, epoch, start_epoch, bn_batches):
    """Called at the end of every epoch: the SWA update (from `start_epoch`, the first milestone) and the BatchNorm
    recomputation with `bn_batches()`, an iterable of training batches (clean, or adversarial with --wa-bn
    adversarial: see utils.bn_batches). Returns whether avg holds weights."""
    if avg is None:
        return False
    if mode == "swa" and epoch >= start_epoch:
        avg.update_parameters(model)
        with torch.no_grad():
            update_bn(bn_batches(), avg.module)
    return int(avg.n_averaged) > 0
