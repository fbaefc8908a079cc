"""The spectral analysis behind SAR (used by eval.py --lowpass / --spectrum).

Low-pass test: each image channel is Fourier transformed, only a centred square of frequencies is kept, and the
image is transformed back. Two readings of the paper's "k x k patch" (--lowpass-window):
  symmetric (default)  |f_y|, |f_x| <= k/2: conjugate-symmetric, so the filtered image is real; for even k this
                       keeps (k+1) x (k+1) frequencies (both -k/2 and +k/2), and k = image size keeps everything;
  kxk                  exactly k x k frequencies, the crop [c - k//2, c - k//2 + k) of the fftshift-ed spectrum
                       (c = size//2; for even k: -k/2 .. k/2 - 1); it is not conjugate-symmetric (f = +k/2 is dropped
                       while -k/2 is kept), so the real part of the inverse transform is taken.
Clean and PGD-20 accuracy are measured on filtered images, the adversarial examples crafted on the unfiltered input.
An adversarially trained model loses little clean accuracy under the filter; a naturally trained one loses much.

Perturbation spectrum: mean over images and channels of |fftshift(FFT2(x' - x))| for PGD perturbations, and its
radial profile (mean amplitude per integer ring around the zero frequency).
"""
import torch

import attacks

K_32 = (32, 28, 24, 20, 16)


def lowpass_ks(size):
    """The paper's k for 32-px images, scaled to other sizes (64 px: 64, 56, 48, 40, 32)."""
    return [k * size // 32 for k in K_32]


def lowpass_mask(h, w, k, device=None, window="symmetric"):
    """Boolean mask of the kept frequencies in the unshifted layout (zero frequency at [0, 0])."""
    fy = (torch.fft.fftfreq(h, device=device) * h).round()[:, None]  # integer frequencies -h//2 .. (h-1)//2
    fx = (torch.fft.fftfreq(w, device=device) * w).round()[None, :]
    if window == "symmetric":
        return (fy.abs() <= k / 2) & (fx.abs() <= k / 2)
    lo = -(k // 2)  # kxk: frequencies lo .. lo + k - 1 on each axis (a k-wide crop of the centred spectrum)
    return (fy >= lo) & (fy < lo + k) & (fx >= lo) & (fx < lo + k)


def lowpass(x, k, window="symmetric"):
    """x: (..., H, W) real images; keeps the centred k x k square of frequencies (see the module's docstring)."""
    mask = lowpass_mask(x.shape[-2], x.shape[-1], k, x.device, window)
    return torch.fft.ifft2(torch.fft.fft2(x.float()) * mask).real


def _pgd_batches(model, x, y, eps, alpha, steps, batch_size):
    """(clean batch, labels, PGD batch) over uint8 images x, the model frozen in eval mode."""
    with attacks.frozen(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].float() / 255, y[i:i + batch_size]
            yield xb, yb, attacks.pgd(model, xb, yb, eps, alpha, steps, random_start=True)


def lowpass_accuracy(model, x, y, ks, eps, alpha, steps=20, batch_size=500, window="symmetric"):
    """{k: (clean accuracy %, PGD accuracy %)} with the filter applied before the model, PGD crafted unfiltered."""
    hits = {k: [0, 0] for k in ks}
    for xb, yb, xa in _pgd_batches(model, x, y, eps, alpha, steps, batch_size=batch_size):
        with torch.no_grad():
            for k in ks:
                hits[k][0] += (model(lowpass(xb, k, window)).argmax(1) == yb).sum().item()
                hits[k][1] += (model(lowpass(xa, k, window)).argmax(1) == yb).sum().item()
    return {k: (100 * c / len(x), 100 * r / len(x)) for k, (c, r) in hits.items()}


def amplitude_spectrum(delta):
    """Mean over images and channels of |fftshift(FFT2(delta))|: an H x W map, zero frequency at the centre."""
    return torch.fft.fftshift(torch.fft.fft2(delta.float()).abs(), dim=(-2, -1)).mean(dim=tuple(range(delta.dim() - 2)))


def radial_profile(spec):
    """Mean amplitude per integer ring r = round(distance to the centre (H//2, W//2))."""
    h, w = spec.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    r = torch.sqrt((yy ** 2 + xx ** 2).float()).round().long().flatten()
    sums = torch.zeros(int(r.max()) + 1).index_add_(0, r, spec.flatten().cpu().float())
    return sums / torch.bincount(r).float()


def perturbation_spectrum(model, x, y, eps, alpha, steps=20, batch_size=500):
    total = 0
    for xb, _, xa in _pgd_batches(model, x, y, eps, alpha, steps, batch_size=batch_size):
        total = total + amplitude_spectrum(xa - xb) * len(xb)
    spec = (total / len(x)).cpu()
    return spec, radial_profile(spec)


def plot_spectra(named, path):
    """named: [(label, spectrum, profile)]; one heat map per checkpoint side by side on one logarithmic colour scale,
    and all radial profiles in one plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    n = len(named)
    fig, axes = plt.subplots(1, n + 2, figsize=(3.2 * n + 4.6, 3.2),
                             gridspec_kw=dict(width_ratios=[1] * n + [0.06, 1.3], wspace=0.45))
    norm = LogNorm(vmin=min(float(s.min()) for _, s, _ in named) + 1e-8, vmax=max(float(s.max()) for _, s, _ in named))
    for ax, (label, spec, _) in zip(axes, named):
        im = ax.imshow(spec.numpy() + 1e-8, cmap="viridis", norm=norm)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, cax=axes[n]).set_label("mean amplitude (log scale)", fontsize=8)
    fig.suptitle("mean amplitude |fftshift(FFT2(x' - x))| of PGD perturbations (zero frequency at the centre)",
                 fontsize=9)
    for label, _, prof in named:
        axes[n + 1].semilogy(prof.numpy(), label=label)
    axes[n + 1].yaxis.tick_right()  # clear of the colour bar's labels
    axes[n + 1].yaxis.set_label_position("right")
    axes[n + 1].set_ylabel("mean amplitude in the ring", fontsize=8)
    axes[n + 1].set_xlabel("frequency radius (0 = mean colour)")
    axes[n + 1].set_title("radial profile", fontsize=8)
    axes[n + 1].legend(fontsize=6)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
