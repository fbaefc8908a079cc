"""Attacks: PGD (L-inf, and L2 as an extension) with the CE or CW loss; FGSM and AutoAttack are in eval.py, their user.
Also the attacks' settings on the command line: fraction (8/255) and within (a range) as argparse types, radius.

Inputs are images in [0, 1]; eps and step sizes are in the same units (8/255, not 0.031).
PGD (Madry et al. 2018), L-inf:  x' <- clip_[0,1]( x + clip_[-eps,eps]( x' + alpha * sign(grad_x' L) - x ) ).
The attacks ask autograd for the input gradient only (torch.autograd.grad): no parameter gradient is computed or
left behind, and the model's train/eval mode is not touched (training attacks run in whatever mode the method
wants; evaluation wraps the model in frozen()).
"""
import argparse
import contextlib
import math

import torch
import torch.nn.functional as F


def cw_loss(logits, y):
    """Per-sample CW margin max_{j != y} z_j - z_y (positive when misclassified); PGD maximises it."""
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return other.max(1).values - z_y


def pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, loss="ce", norm="Linf", noise=None):
    """Projected gradient ascent on `loss` ("ce", or "cw": the margin of cw_loss) within the eps-ball around x and
    the [0,1] box; returns x' detached. L-inf: sign steps; L2: steps along the normalised gradient. The random start
    is x + U(-eps, eps) (L2: a uniform direction at a radius uniform in [0, eps], as Rice et al.); `noise` is the draw
    to take it from, U(0, 1) for L-inf, a point of the unit ball for L2 (default: drawn here; the training loops pass
    one drawn for the global batch, so that N processes start where one would). Input gradients only: no parameter
    gradient is computed or left behind. Needs torch, torch.nn.functional as F and cw_loss."""
    if loss not in ("ce", "cw"):
        raise ValueError(f"unknown attack loss {loss!r}; use 'ce' or 'cw'")
    x = x.detach()
    per_image = (-1,) + (1,) * (x.dim() - 1)
    l2 = lambda v: v.flatten(1).norm(dim=1).clamp_min(1e-12).view(per_image)  # noqa: E731 (per-image L2 norm)
    if not random_start:
        delta = torch.zeros_like(x)
    elif norm == "Linf":
        u = torch.rand_like(x) if noise is None else noise
        delta = u * (2 * eps) - eps
    elif noise is not None:  # a point of the unit ball, drawn by the caller
        delta = noise * eps
    else:
        delta = torch.randn_like(x)
        delta = delta / l2(delta) * eps * torch.rand(len(x), device=x.device).view(per_image)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x + delta).float()  # summed over the batch: only each image's gradient direction matters
        objective = F.cross_entropy(logits, y, reduction="sum") if loss == "ce" else cw_loss(logits, y).sum()
        (g,) = torch.autograd.grad(objective, delta)
        if norm == "Linf":
            delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
        else:
            delta = delta.detach() + alpha * g / l2(g)
            delta = delta * (eps / l2(delta)).clamp(max=1.0)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


@contextlib.contextmanager
def frozen(model):
    """Evaluation attacks: eval() mode (BatchNorm statistics fixed) and no parameter needs a gradient.
    The previous mode and requires_grad flags are restored on exit."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def correct(model, x, y, batch_size=500, attack=None, **attack_kw):
    """Per-sample correctness (bool tensor) of the frozen model on x (uint8 or float in [0,1]), optionally after
    an attack (a function like pgd, called with attack_kw). fp32: no autocast."""
    out = []
    with frozen(model), torch.autocast(x.device.type, enabled=False):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb.float()
            if attack is not None:
                xb = attack(model, xb, yb, **attack_kw)
            with torch.no_grad():
                out.append(model(xb).argmax(1) == yb)
    return torch.cat(out)


def accuracy(model, x, y, eps, alpha, steps, norm="Linf", loss="ce"):
    """Clean and PGD-`steps` accuracy (%) of the frozen model on (x, y), fp32, random start, PGD on `loss` ("ce" or
    "cw"): the methods' validation. PGD is None for eps 0 (natural training); both are None without a model or
    images."""
    if model is None or len(y) == 0:
        return None, None
    acc = lambda **attack: 100 * correct(model, x, y, **attack).float().mean().item()  # noqa: E731
    return acc(), acc(attack=pgd, eps=eps, alpha=alpha, steps=steps, norm=norm, loss=loss) if eps > 0 else None


def fraction(s):
    """argparse type for radii and steps: '8/255' or a plain number, both in [0,1] pixel units."""
    try:
        num, _, den = s.partition("/")
        v = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a number or a fraction like 8/255") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def within(interval, kind=float):
    """argparse type=: a `kind` (int, float, fraction) in `interval`, such as "[0, 1)" or "(0, inf)"; a value outside
    is argparse's one-line error naming the flag."""
    def convert(s):
        v, lo, hi = kind(s), *(float(b) for b in interval[1:-1].split(","))
        if v < lo or v > hi or (v == lo and interval[0] == "(") or (v == hi and interval[-1] == ")"):
            raise argparse.ArgumentTypeError(f"{s} is outside {interval}; give a value in it")
        return v
    convert.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" for text that is no number
    return convert


def radius(v, norm="Linf", digits=4):
    """An L-inf radius or step as the user would write it: 8/255 for multiples of 1/255 in (0, 1] (-8/255 too; 0.2
    stays 0.2); anything else (0.1, 0.031, 8, L2 radii) as a number with `digits` significant digits."""
    k = v * 255
    if norm == "Linf" and 0 < abs(v) <= 1 and abs(k - round(k)) < 1e-6 and round(v, 3) != v:  # 0.2, not 51/255
        return f"{round(k)}/255"
    return f"{v:.{digits}g}"


def describe(name, eps, alpha, steps, norm="Linf", restarts=1, random_start=True):
    """A PGD or CW attack's settings ("PGD-10 (Linf, eps 8/255, step 2/255, random start, 1 restart)"), printed beside
    every number it produces (eval.py's describe adds its other attacks)."""
    r = f"{restarts} restart" + ("s" if restarts > 1 else "")
    return (f"{name.upper()}-{steps} ({norm}, eps {radius(eps, norm)}, step {radius(alpha, norm)}, "
            f"{'' if random_start else 'no '}random start, {r})")
