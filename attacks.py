"""Attacks: PGD (L-inf, and L2 as an extension), FGSM, CW-inf, and the AutoAttack entry point.

Inputs are images in [0, 1]; eps and step sizes are in the same units (8/255, not 0.031).
PGD (Madry et al. 2018), L-inf:  x' <- clip_[0,1]( x + clip_[-eps,eps]( x' + alpha * sign(grad_x' L) - x ) ).
The attacks ask autograd for the input gradient only (torch.autograd.grad): no parameter gradient is computed or
left behind, and the model's train/eval mode is not touched (training attacks run in whatever mode the method
wants; evaluation wraps the model in frozen()).
"""
import contextlib

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


def fgsm(model, x, y, eps=8 / 255, norm="Linf"):
    """FGSM (Goodfellow et al. 2015): one step of size eps from x (L2: along the normalised gradient)."""
    return pgd(model, x, y, eps=eps, alpha=eps, steps=1, random_start=False, norm=norm)


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


def autoattack(model, x, y, eps=8 / 255, norm="Linf", batch_size=500, seed=0, version="standard", n_examples=None,
               log=None, state=None, save=None, rates=None):
    """AutoAttack (Croce & Hein 2020) through pyautoattack==0.2.0: standard = APGD-CE, APGD-T, FAB-T, Square, each
    run on the images still robust after the ones before, as the library's run_standard_evaluation runs them (the
    same batches, each component seeded with `seed` as it starts), one component at a time: `state` (a dict;
    {"done": [...], "robust": per-image flags}) is updated after each component and `save()` called, so that an
    evaluation killed inside a component continues with that component, and the per-image result is that of an
    uninterrupted run. eps, seed and device are passed explicitly (the library's defaults are eps 0.3 and a
    time-based seed); the global random state it reseeds is restored; fp32; gradients FAB leaves on the parameters
    are cleared. `rates` ({component: seconds per image attacked}, kept by the caller across chunks) gives the time
    left in the log line. Returns per-sample correctness on the final, point-wise worst case of the first n_examples
    images."""
    import time
    from pyautoattack import AutoAttack
    x, y = x[:n_examples], y[:n_examples]
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    state = {} if state is None else state
    rates = {} if rates is None else rates
    say = log or (lambda m: None)
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with frozen(model), torch.random.fork_rng(devices=devices), torch.autocast(x.device.type, enabled=False):
            adversary = AutoAttack(model, norm=norm, eps=eps, version=version, device=x.device, seed=seed)
            if "robust" not in state:
                with torch.no_grad():
                    state.update(done=[], robust=correct(model, x, y, batch_size).cpu())
            robust = state["robust"].to(x.device).clone()
            for attack in adversary.attacks_to_run:
                if attack in state["done"]:
                    continue
                t0 = time.time()
                idx = robust.nonzero()[:, 0]
                for s in range(0, len(idx), batch_size):  # the library's batches of the robust images
                    b = idx[s:s + batch_size]
                    adv = _aa_component(adversary, attack, x[b], y[b]).detach()
                    dist = (adv - x[b]).flatten(1)
                    dist = dist.abs().max(1).values if norm == "Linf" else dist.norm(dim=1)
                    assert float(dist.max()) <= eps + 1e-5 and 0 <= float(adv.min()) and float(adv.max()) <= 1
                    with torch.no_grad():
                        robust[b[model(adv).argmax(1) != y[b]]] = False
                state["done"] = state["done"] + [attack]
                state["robust"] = robust.cpu().clone()
                if len(idx):
                    rates[attack] = (time.time() - t0) / len(idx)
                if save is not None:
                    save()
                rest = adversary.attacks_to_run[adversary.attacks_to_run.index(attack) + 1:]
                known = not robust.any() or all(a in rates for a in rest)
                left = (f"~{sum(rates.get(a, 0) for a in rest) * int(robust.sum()):.0f} s left in these {len(y)} "
                        f"images" if known else "time left known after the first images")
                say(f"  AutoAttack {attack}: {int(robust.sum())}/{len(y)} images still robust, "
                    f"{time.time() - t0:.0f} s" + (f", {left}" if rest else ""))
    finally:
        for p in model.parameters():
            p.grad = None
    return state["robust"].to(y.device)


def square(model, x, y, eps=8 / 255, norm="Linf", queries=5000, seed=0):
    """AutoAttack's Square (Andriushchenko et al. 2020) alone, a score-based black-box attack: it asks the model for
    scores only, never for a gradient. Set up by the standard AutoAttack itself (its p_init, restarts and seed), with
    `queries` queries; the global random state it reseeds is restored; fp32. Returns per-sample correctness."""
    from pyautoattack import AutoAttack
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    devices = [x.device] if x.device.type == "cuda" else []
    with frozen(model), torch.random.fork_rng(devices=devices), torch.autocast(x.device.type, enabled=False):
        adversary = AutoAttack(model, norm=norm, eps=eps, version="standard", device=x.device, seed=seed)
        adversary.square.n_queries = queries
        adv = _aa_component(adversary, "square", x, y).detach()
        with torch.no_grad():
            return model(adv).argmax(1) == y


def _aa_component(adversary, attack, x, y):
    """One AutoAttack component on a batch, set up as run_standard_evaluation sets it up."""
    if attack in ("apgd-ce", "apgd-dlr"):
        adversary.apgd.loss = attack[5:]
        adversary.apgd.seed = adversary.get_seed()
        return adversary.apgd.perturb(x, y)
    if attack == "apgd-t":
        adversary.apgd_targeted.seed = adversary.get_seed()
        return adversary.apgd_targeted.perturb(x, y)
    if attack in ("fab", "fab-t"):
        adversary.fab.targeted = attack == "fab-t"
        if attack == "fab-t":
            adversary.fab.n_restarts = 1
        adversary.fab.seed = adversary.get_seed()
        return adversary.fab.perturb(x, y)
    if attack == "square":
        adversary.square.seed = adversary.get_seed()
        return adversary.square.perturb(x, y)
    raise ValueError(f"unknown AutoAttack component {attack!r}")


def fraction(s):
    """argparse type for radii and steps: '8/255' or a plain number, both in [0,1] pixel units."""
    import argparse
    import math
    try:
        num, _, den = s.partition("/")
        v = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a number or a fraction like 8/255") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def radius(v, norm="Linf", digits=4):
    """An L-inf radius or step as the user would write it: 8/255 for multiples of 1/255 in (0, 1] (-8/255 too; 0.2
    stays 0.2),
    anything else (0.1, 0.031, 8, L2 radii) as a number with `digits` significant digits."""
    k = v * 255
    if norm == "Linf" and 0 < abs(v) <= 1 and abs(k - round(k)) < 1e-6 and round(v, 3) != v:  # 0.2, not 51/255
        return f"{round(k)}/255"
    return f"{v:.{digits}g}"


def describe(name, eps, steps=None, alpha=None, norm="Linf", restarts=1, queries=None):
    """The attack's settings, printed beside every number it produces."""
    e = radius(eps, norm)
    if name == "clean":
        return "clean"
    if name == "square":
        return f"Square-{queries} ({norm}, eps {e}, on the images every white-box attack at eps left robust)"
    if name == "aa":
        return f"AutoAttack standard ({norm}, eps {e})"
    if name == "aa-rand":
        return f"AutoAttack rand ({norm}, eps {e}, APGD-CE and APGD-DLR with EOT over 20 passes)"
    if name == "fgsm":
        return f"FGSM ({norm}, eps {e}, one step of size eps, no random start)"
    a = radius(alpha, norm)
    r = f"{restarts} restart" + ("s" if restarts > 1 else "")
    return f"{name.upper()}-{steps} ({norm}, eps {e}, step {a}, random start, {r})"
