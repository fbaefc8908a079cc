"""Is the evaluation to be trusted? The gradient-masking checks of Carlini et al., "On Evaluating Adversarial
Robustness" (2019) and Athalye, Carlini, Wagner (2018), and the robustness curve; eval.py --checks / --curve run them.

A defence whose gradients are masked (a saturated softmax, a non-differentiable or randomised input stage) looks
robust to gradient attacks and is not. Each check compares two attacks, or an attack with what it must reach, on the
same first images (eval.py stores every attack's per-image result, so the numbers below are those attacks' own):

  1 margin vs cross-entropy  CW-30 accuracy is not clearly below PGD-20's (a saturated softmax hides CE gradients)
  2 convergence              PGD with 5x the steps at 1/5 of the step (the same path length) and 5 restarts lowers
                             PGD-20's accuracy by no more than 2 points
  3 one step vs many         FGSM accuracy is not below PGD-20's
  4 unbounded attack         PGD-20 at a radius that reaches a grey image from any image (L-inf 0.5; L2 half the
                             diagonal of the image cube) leaves at most 1 % accuracy
  5 monotone in the radius   PGD-20 and CW-30 accuracy does not rise along 0, eps/4, eps/2, eps, 2 eps, 4 eps
  6 white box vs black box   AutoAttack's Square (score-based, no gradients) breaks at most 2 % of the images
                             (all n of them) among those every white-box attack at eps left robust
  7 gradients                at most 1 % of the images have an input gradient that is exactly zero (CE; margin)
  8 determinism              two passes of the same images give the same logits (else: a randomised model, EOT)

Thresholds take the sample size into account. Checks 1-7 measure a gap g in percentage points between two results
on the same n images, and WARN only when g is larger than the check's margin (MARGINS) AND larger than Z = 2
standard errors of that gap: 100 * sqrt(d) / n, where d is the number of images on which the two results disagree
(McNemar's test: under "no real difference" each disagreement goes either way with probability 1/2). For a share
that should be zero (checks 4, 6, 7) d is the count itself, so a WARN needs at least 5 images.
"""
import math

import torch
import torch.nn.functional as F

import attacks

Z = 2.0
MARGINS = {"margin vs cross-entropy": 5.0, "convergence": 2.0, "one step vs many": 0.0, "unbounded attack": 1.0,
           "monotone in the radius": 0.0, "white box vs black box": 2.0, "gradients": 1.0}
NAMES = list(MARGINS) + ["determinism"]
STRONG_STEPS, STRONG_RESTARTS = 5, 5  # the convergence check's attack: 5x the steps at 1/5 of the step, 5 restarts
SQUARE_QUERIES = 5000  # AutoAttack's standard Square


def radii(eps, norm="Linf"):
    """The sweep of the curve: 0, eps/4, eps/2, eps, 2 eps, 4 eps (L-inf radii above 1 are all the same ball)."""
    out = [0.0, eps / 4, eps / 2, eps, 2 * eps, 4 * eps]
    return sorted({min(r, 1.0) for r in out}) if norm == "Linf" else out


def unbounded_radius(norm, image_shape):
    """A radius that reaches the grey image 0.5 from every image in [0, 1]^d."""
    return 0.5 if norm == "Linf" else 0.5 * math.sqrt(math.prod(image_shape))


def gap_test(gap, disagree, n, margin):
    """(warn, two standard errors): a gap of `gap` points counts only beyond the margin and beyond Z standard errors
    100 * sqrt(disagree) / n of a paired difference on n images."""
    se2 = Z * 100 * math.sqrt(disagree) / n
    return gap > margin and gap > se2, se2


def paired(a, b):
    """Gap (points) of accuracy a over accuracy b, and how many images the two per-image results disagree on."""
    return 100 * (int(a.sum()) - int(b.sum())) / len(a), int((a != b).sum())


def zero_gradients(model, x, y, batch_size=500):
    """Per-image flags: the input gradient of the CE loss / of the CW margin is exactly zero everywhere (fp32)."""
    ce, cw = [], []
    with attacks.frozen(model), torch.autocast(x.device.type, enabled=False):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            xb = (xb.float() / 255 if xb.dtype == torch.uint8 else xb.float()).requires_grad_(True)
            yb = y[i:i + batch_size]
            logits = model(xb).float()
            g_ce, = torch.autograd.grad(F.cross_entropy(logits, yb, reduction="sum"), xb, retain_graph=True)
            g_cw, = torch.autograd.grad(attacks.cw_loss(logits, yb).sum(), xb)
            ce.append(g_ce.flatten(1).abs().amax(1) == 0)
            cw.append(g_cw.flatten(1).abs().amax(1) == 0)
    return torch.cat(ce).cpu(), torch.cat(cw).cpu()


def repeat_passes(model, x, batch_size=500):
    """Two passes over the same images: (largest |logit difference|, largest |logit|, images whose prediction
    changed)."""
    diff, scale, changed = 0.0, 0.0, 0
    with attacks.frozen(model), torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb.float()
            a, b = model(xb).float(), model(xb).float()
            diff = max(diff, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            changed += int((a.argmax(1) != b.argmax(1)).sum())
    return diff, scale, changed


def verdicts(r, n):
    """The eight checks from per-image results on the same n images. r holds bool tensors: clean, fgsm, pgd, cw,
    strong, unbounded, whitebox (robust to every white-box attack at eps), square (robust to those and to Square),
    zero_ce, zero_cw; curve_pgd / curve_cw: lists over radii(); r["labels"]: the attacks' short names (their settings
    are in the JSON); r["passes"]: repeat_passes' triple. Returns a list of dicts (check, status, gap, threshold,
    text)."""
    out = []
    d = dict(r["labels"])
    d["strong"] += f" x{STRONG_RESTARTS} restarts"
    d["unbounded"] += f" at radius {attacks.radius(r['unbounded_eps'], r['norm'])}"

    def add(check, warn, gap, se2, text, advice, **numbers):
        out.append(dict(check=check, status="WARN" if warn else "PASS", gap=round(gap, 4),
                        threshold=round(max(MARGINS.get(check, 0.0), se2), 4), numbers=numbers,
                        text=text + (": " + advice if warn else "")))

    def acc(t):
        return 100 * t.float().mean().item()

    def lower(gap):
        return f"lower by {gap:.2f} points" if gap >= 0 else f"higher by {-gap:.2f} points"

    def below_pgd(check, other, who, advice):  # `other`'s accuracy below PGD's by more than margin and noise
        gap, dis = paired(r["pgd"], r[other])
        warn, se2 = gap_test(gap, dis, n, MARGINS[check])
        add(check, warn, gap, se2, f"{d[other]} {acc(r[other]):.2f} % vs {d['pgd']} {acc(r['pgd']):.2f} %: "
            f"{who}{lower(gap)}", advice, pgd=acc(r["pgd"]), **{other: acc(r[other])}, disagree=dis)
    below_pgd("margin vs cross-entropy", "cw", "CW ",
              "CE gradients vanish (a saturated softmax?); report CW / AutoAttack, not PGD-CE")
    below_pgd("convergence", "strong", "", f"{d['pgd']} had not converged and overstates robustness by that much; "
              "report a stronger attack (more steps and restarts, AutoAttack)")
    below_pgd("one step vs many", "fgsm", "FGSM ",
              "one step does better than many: the loss surface is masked near the images (gradient masking)")
    k = int(r["unbounded"].sum())
    warn, se2 = gap_test(100 * k / n, k, n, MARGINS["unbounded attack"])
    add("unbounded attack", warn, 100 * k / n, se2, f"{d['unbounded']} {100 * k / n:.2f} % ({k} images)",
        "an attack that can reach a grey image does not break every image: its gradients do not lead anywhere",
        unbounded=acc(r["unbounded"]), robust=k)
    rise, text = None, []  # (gap, 2 SE, warn) of the largest rise from one radius to the next
    for name in ("pgd", "cw"):
        text.append(f"{name.upper()} " + " -> ".join(f"{acc(t):.1f}" for t in r["curve_" + name]) + " %")
        for lo, hi in zip(r["curve_" + name], r["curve_" + name][1:]):
            gap, dis = paired(hi, lo)  # accuracy at the larger radius over the one at the smaller
            warn, se2 = gap_test(gap, dis, n, MARGINS["monotone in the radius"])
            if rise is None or (warn, gap) > (rise[2], rise[0]):
                rise = (gap, se2, warn)
    add("monotone in the radius", rise[2], rise[0], rise[1],
        "; ".join(text) + " over radii " + ", ".join(attacks.radius(x, r["norm"]) for x in r["radii"]),
        f"accuracy rises with the radius (by {rise[0]:.2f} points): the attack does not find what a larger ball holds",
        radii=list(r["radii"]), pgd=[acc(t) for t in r["curve_pgd"]], cw=[acc(t) for t in r["curve_cw"]])
    k = int((r["whitebox"] & ~r["square"]).sum())
    warn, se2 = gap_test(100 * k / n, k, n, MARGINS["white box vs black box"])
    add("white box vs black box", warn, 100 * k / n, se2,
        f"{d['square']} broke {k} of the {int(r['whitebox'].sum())} images every white-box attack left robust "
        f"({100 * k / n:.2f} % of {n})",
        "a black-box attack succeeds where the gradient attacks failed: gradients are masked; report AutoAttack",
        whitebox_robust=int(r["whitebox"].sum()), broken=k)
    zc, zm = int(r["zero_ce"].sum()), int(r["zero_cw"].sum())
    k = max(zc, zm)
    warn, se2 = gap_test(100 * k / n, k, n, MARGINS["gradients"])
    add("gradients", warn, 100 * k / n, se2,
        f"input gradient exactly zero on {zc} images (CE), {zm} images (margin) of {n}",
        ("CE gradients vanish where the margin's do not (a saturated softmax): use the margin (CW) loss"
         if zc > zm else "the input gradient is zero (a non-differentiable or quantising input stage?): use a "
         "differentiable approximation (BPDA) and a black-box attack"), zero_ce=zc, zero_cw=zm)
    diff, scale, changed = r["passes"]
    warn = diff > 1e-4 * (1 + scale) or changed > 0
    out.append(dict(check="determinism", status="WARN" if warn else "PASS", gap=diff, threshold=1e-4 * (1 + scale),
                    numbers=dict(max_difference=diff, max_logit=scale, changed=changed),
                    text=f"two passes of the same {n} images: largest |logit difference| {diff:.3g} (largest |logit| "
                         f"{scale:.3g}), {changed} predictions changed" + (
                        ": the model is randomised; gradient attacks need EOT (average the gradient over many passes) "
                        "and AutoAttack version='rand' (eval.py --attacks aa-rand); the numbers above are not a "
                        "robustness claim" if warn else "")))
    return out


def plot_curves(curves, path, names=("PGD", "CW")):
    """curves: [(label, norm, radii, pgd accuracies, cw accuracies, training radius or None)]; accuracy
    against the radius, PGD solid and CW dashed, one colour per checkpoint, the training radius dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.get_cmap("tab10").colors
    handles, norm = [], curves[0][1]
    for i, (label, norm, rs, pgd, cw, train_eps) in enumerate(curves):
        c = colours[i % len(colours)]
        ax.plot(rs, pgd, "-o", color=c, markersize=4)
        ax.plot(rs, cw, "--s", color=c, markersize=4)
        if train_eps:
            ax.axvline(train_eps, color=c, linestyle=":", linewidth=1.5)
        handles.append(Line2D([], [], color=c, label=label + (f" (trained at {attacks.radius(train_eps, norm)})"
                                                              if train_eps else " (trained without an attack)")))
    all_r = sorted({x for cv in curves for x in cv[2]})
    ax.set_xticks(all_r)
    ax.set_xticklabels([attacks.radius(x, norm) for x in all_r], rotation=30, fontsize=8)
    ax.set_xlabel(f"attack radius ({norm}{', pixel values in [0, 1]' if norm == 'Linf' else ''})")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title("robustness curve: accuracy against the radius (radius 0: clean)", fontsize=10)
    styles = [Line2D([], [], color="grey", linestyle="-", marker="o", markersize=4,
                     label=f"{names[0]} (cross-entropy)"),
              Line2D([], [], color="grey", linestyle="--", marker="s", markersize=4, label=f"{names[1]} (margin)"),
              Line2D([], [], color="grey", linestyle=":", label="training radius")]
    ax.legend(handles=handles + styles, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
