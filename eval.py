"""Evaluate any checkpoint: clean, PGD-20, CW-30 and AutoAttack accuracy on the test split.

    python eval.py runs/at-cifar10-preact_resnet18/best.pt
    python eval.py last.pt --weights wa --attacks clean pgd aa --n-examples 1000
    python eval.py trades_wrn.pt --arch wrn34_10 --dataset cifar10          # a bare state dict

The model is in eval() mode with frozen parameters for every attack, in fp32. Every number is printed with its
attack's settings, and all of them are written as JSON beside the checkpoint (NAME.eval.json, NAME.wa.eval.json).
The `worst case` row counts an image as robust only if it survived every attack that was run on it.

    python eval.py at/best.pt sar/best.pt --attacks --lowpass --spectrum   # the spectral analysis (spectral.py)
"""
import argparse
import json
import os
import time

import torch

import attacks
import data
import models
import spectral
import utils

ATTACKS = ("clean", "pgd", "cw", "aa")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate checkpoints with clean / PGD / CW / AutoAttack accuracy")
    p.add_argument("checkpoints", nargs="+", help="this project's checkpoints, or bare state dicts with --arch")
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--weights", default="model", choices=["model", "wa"], help="raw weights or the weight average")
    p.add_argument("--arch", default=None, help="for bare state dicts: " + ", ".join(models.ARCHS))
    p.add_argument("--dataset", default=None, help="for bare state dicts: " + ", ".join(data.DATASETS))
    p.add_argument("--data-dir", default=None, help="default: the one the checkpoint was trained with, else data")
    p.add_argument("--n-examples", type=int, default=10000, help="the first N test images")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--eps", type=utils.fraction, default=None, help="radius (default 8/255 for Linf, 0.5 for L2)")
    p.add_argument("--alpha", type=utils.fraction, default=None, help="PGD/CW step (default eps/4)")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--cw-steps", type=int, default=30)
    p.add_argument("--restarts", type=int, default=1, help="PGD/CW restarts (an image must survive all)")
    p.add_argument("--lowpass", action="store_true", help="clean and PGD accuracy under centred k x k low-pass filters")
    p.add_argument("--spectrum", action="store_true", help="mean amplitude spectrum of PGD perturbations (+ PNG)")
    p.add_argument("--spectrum-out", default=None, help="PNG path (default: beside the first checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.eps = args.eps if args.eps is not None else (8 / 255 if args.norm == "Linf" else 0.5)
    args.alpha = args.alpha if args.alpha is not None else args.eps / 4
    return args


def load_model(path, args, device):
    """Builds the model a checkpoint was trained as and loads its weights. Returns (model, info dict)."""
    ck = utils.load_checkpoint(path)
    if isinstance(ck, dict) and ck.get("format") == utils.CKPT_FORMAT:
        arch, dataset = ck["arch"], ck["dataset"]
        for flag, given, saved in (("--arch", args.arch, arch), ("--dataset", args.dataset, dataset)):
            if given is not None and given != saved:
                raise SystemExit(f"error: {path} was trained with {flag} {saved}, not {given}; drop {flag}")
        if args.weights == "wa":
            if ck.get("weights") == "wa":
                sd = ck["model"]
            elif ck.get("wa_model") is not None:
                sd = ck["wa_model"]
            else:
                raise SystemExit(f"error: {path} holds no weight average (trained without --wa); drop --weights wa")
        else:
            sd = ck["model"]
        data_dir = args.data_dir or ck["args"].get("data_dir", "data")
        info = dict(epoch=ck["epoch"], method=ck["method"], weights=ck.get("weights", args.weights),
                    num_classes=ck["num_classes"])
    else:
        if args.arch is None or args.dataset is None:
            raise SystemExit(f"error: {path} is not a checkpoint of this project; pass --arch and --dataset to "
                             f"read it as a bare state dict")
        if args.weights == "wa":
            raise SystemExit(f"error: --weights wa needs a checkpoint of this project; {path} is a bare state dict")
        arch, dataset, data_dir = args.arch, args.dataset, args.data_dir or "data"
        sd = ck
        for key in ("state_dict", "model_state_dict"):  # common wrappers of other projects
            if isinstance(ck, dict) and isinstance(ck.get(key), dict):
                sd = ck[key]
        info = dict(num_classes={"cifar100": 100, "tiny_imagenet": 200}.get(dataset, 10))
    model = models.get_model(arch, info["num_classes"])
    utils.load_weights(model, sd, path, arch)
    info.update(arch=arch, dataset=dataset, data_dir=data_dir)
    return model.to(device).eval(), info


def evaluate(model, x, y, args, log=print):
    """Runs the chosen attacks; returns {name: {accuracy, attack, seconds}} and the per-image worst case."""
    results, worst = {}, torch.ones(len(y), dtype=torch.bool, device=y.device)
    for name in args.attacks:
        t0 = time.time()
        if name == "clean":
            ok = attacks.correct(model, x, y, args.batch_size)
        elif name in ("pgd", "cw"):
            steps = args.pgd_steps if name == "pgd" else args.cw_steps
            ok = worst.clone().fill_(True)
            for _ in range(args.restarts):
                ok &= attacks.correct(model, x, y, args.batch_size, attack=attacks.pgd, eps=args.eps, alpha=args.alpha,
                                      steps=steps, random_start=True, loss="ce" if name == "pgd" else "cw",
                                      norm=args.norm)
        else:
            ok = attacks.autoattack(model, x, y, args.eps, args.norm, args.batch_size, args.seed, log=log)
        worst &= ok
        steps = {"pgd": args.pgd_steps, "cw": args.cw_steps}.get(name)
        results[name] = dict(accuracy=100 * ok.float().mean().item(), seconds=time.time() - t0,
                             attack=attacks.describe(name, args.eps, steps, args.alpha, args.norm, args.restarts))
    if len([a for a in args.attacks if a != "clean"]) > 1:
        results["worst"] = dict(accuracy=100 * worst.float().mean().item(), seconds=0.0,
                                attack="worst case over the attacks above, per image")
    return results


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    out, spectra = {}, []
    for path in args.checkpoints:
        model, info = load_model(path, args, device)
        ds = data.load(info["dataset"], info["data_dir"], val_size=0, device=device)
        n = min(args.n_examples, len(ds["test_x"]))
        x, y = ds["test_x"][:n], ds["test_y"][:n]
        torch.manual_seed(args.seed)
        weights = info.get("weights", args.weights)
        print(f"{path}: {info['arch']} ({info.get('method', 'state dict')}, {weights} weights, "
              f"epoch {info.get('epoch', '?')}), {info['dataset']} test, first {n} images")
        results = evaluate(model, x, y, args)
        for r in results.values():
            print(f"  {r['attack']:<62} {r['accuracy']:6.2f} %  {r['seconds']:7.1f} s")
        record = dict(checkpoint=path, n_examples=n, seed=args.seed, **info, results=results)
        pgd_name = attacks.describe("pgd", args.eps, args.pgd_steps, args.alpha, args.norm)
        if args.lowpass:
            lp = spectral.lowpass_accuracy(model, x, y, spectral.lowpass_ks(x.shape[-1]), args.eps, args.alpha,
                                           args.pgd_steps, args.batch_size)
            print(f"  low-pass k x k   clean %    PGD %   ({pgd_name}, crafted on unfiltered images)")
            for k, (c, r) in lp.items():
                print(f"  k = {k:<12} {c:7.2f}  {r:7.2f}")
            accuracy = {str(k): dict(clean=c, pgd=r) for k, (c, r) in lp.items()}
            record["lowpass"] = dict(attack=pgd_name, accuracy=accuracy)
        if args.spectrum:
            spec, prof = spectral.perturbation_spectrum(model, x, y, args.eps, args.alpha, args.pgd_steps,
                                                        args.batch_size)
            print("  perturbation spectrum, radial profile (low to high frequency): "
                  + " ".join(f"{v:.3g}" for v in prof.tolist()))
            record["spectrum"] = dict(attack=pgd_name, amplitude=spec.tolist(), radial_profile=prof.tolist())
            label = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
            spectra.append((label + (" (wa)" if args.weights == "wa" else ""), spec, prof))
        stem = os.path.splitext(path)[0] + (".wa" if args.weights == "wa" else "")
        with open(stem + ".eval.json", "w") as f:
            json.dump(record, f, indent=1)
        out[path] = record
    if spectra:
        png = args.spectrum_out or os.path.splitext(args.checkpoints[0])[0] + ".spectrum.png"
        spectral.plot_spectra(spectra, png)
        print(f"perturbation spectra: {png}")
    return out


if __name__ == "__main__":
    main()
