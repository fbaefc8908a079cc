"""Evaluate any checkpoint: clean, FGSM, PGD-20, CW-30 and AutoAttack accuracy on the test split.

    python eval.py runs/at-cifar10-preact_resnet18/best.pt
    python eval.py last.pt --weights wa --attacks clean pgd aa --n-examples 1000
    python eval.py trades_wrn.pt --arch wrn34_10 --dataset cifar10          # a bare state dict

The model is in eval() mode with frozen parameters for every attack, in fp32. Every number is printed with its
attack's settings. Nothing computed is lost:
  - results go to NAME.eval.json beside the checkpoint (NAME.wa.eval.json for --weights wa; --results-dir DIR puts
    them in DIR/<folder of the checkpoint>/ instead), one entry per attack, its settings, number of images and date.
    A new run adds or replaces only the entries of the attacks it ran; an entry is replaced only by the same attack
    with the same settings on the same images;
  - each attack's result is written as soon as it is done, and the per-image results of every finished chunk of
    --batch-size images are kept in NAME.eval.pt: running the same command again after a kill continues where it
    stopped, and attacks already done are not run again (--redo runs them again). Every chunk draws its randomness
    from (--seed, attack, chunk), so a resumed evaluation gives the numbers of an uninterrupted one;
  - the files belong to one checkpoint file (its SHA-256 is stored): when the checkpoint has changed since (a newer
    best.pt), the old results are moved aside to NAME.eval.epochE-HASH.json/.pt, never mixed with the new ones.
The `worst case` row counts an image as robust only if it survived every attack stored for the same images.

    python eval.py at/best.pt sar/best.pt --attacks --lowpass --spectrum   # the spectral analysis (spectral.py)
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
import zlib

import torch

import attacks
import data
import models
import spectral
import utils

ATTACKS = ("clean", "fgsm", "pgd", "cw", "aa")
NAMES = {"clean": "clean", "fgsm": "FGSM", "pgd": "PGD", "cw": "CW", "aa": "AutoAttack"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate checkpoints with clean / FGSM / PGD / CW / AutoAttack accuracy")
    p.add_argument("checkpoints", nargs="+", help="this project's checkpoints, or bare state dicts with --arch")
    p.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=ATTACKS)
    p.add_argument("--weights", default="model", choices=["model", "wa"], help="raw weights or the weight average")
    p.add_argument("--arch", default=None, help="for bare state dicts: " + ", ".join(models.ARCHS))
    p.add_argument("--dataset", default=None, help="for bare state dicts: " + ", ".join(data.DATASETS))
    p.add_argument("--data-dir", default=None, help="default: the one the checkpoint was trained with, else data")
    p.add_argument("--n-examples", type=int, default=10000, help="the first N test images")
    p.add_argument("--batch-size", type=int, default=500, help="also the chunk whose results are kept as it ends")
    p.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    p.add_argument("--eps", type=utils.fraction, default=None, help="radius (default 8/255 for Linf, 0.5 for L2)")
    p.add_argument("--alpha", type=utils.fraction, default=None, help="PGD/CW step (default eps/4)")
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--cw-steps", type=int, default=30)
    p.add_argument("--restarts", type=int, default=1, help="PGD/CW restarts (an image must survive all)")
    p.add_argument("--redo", action="store_true", help="run the attacks again even where their results are stored")
    p.add_argument("--results-dir", default=None, help="write results to DIR/<checkpoint's folder>/ instead")
    p.add_argument("--lowpass", action="store_true", help="clean and PGD accuracy under centred k x k low-pass filters")
    p.add_argument("--lowpass-window", default="symmetric", choices=["symmetric", "kxk"],
                   help="symmetric: |f| <= k/2 on both axes ((k+1) x (k+1) for even k, a real filter); kxk: exactly "
                        "the k x k centred frequencies of the paper's 'k x k patch', real part of the inverse")
    p.add_argument("--spectrum", action="store_true", help="mean amplitude spectrum of PGD perturbations (+ PNG)")
    p.add_argument("--spectrum-out", default=None, help="PNG path (default: beside the first results file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = utils.parse_args(p, argv)
    args.eps = args.eps if args.eps is not None else (8 / 255 if args.norm == "Linf" else 0.5)
    args.alpha = args.alpha if args.alpha is not None else args.eps / 4
    utils.require(args.n_examples >= 1, f"--n-examples {args.n_examples}: evaluate at least 1 image")
    utils.require(args.batch_size >= 1, f"--batch-size {args.batch_size}: use a positive batch size, e.g. 500")
    utils.require(args.eps > 0 and (args.norm == "L2" or args.eps <= 1),
                  f"--eps {utils.show(args.eps)}: L-inf radii are in (0, 1] pixel units (8/255, not 8)")
    utils.require(args.alpha > 0, f"--alpha {args.alpha:g}: use a positive step")
    utils.require(args.pgd_steps >= 1 and args.cw_steps >= 1, "--pgd-steps and --cw-steps: use at least 1 step")
    utils.require(args.restarts >= 1, f"--restarts {args.restarts}: use at least 1")
    utils.require(args.seed >= 0, f"--seed {args.seed}: use a seed >= 0")
    utils.require(args.attacks or args.lowpass or args.spectrum,
                  "nothing to do: give --attacks, --lowpass or --spectrum")
    utils.check_device(args.device)
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
            elif ck.get("wa_model") is not None and ck.get("wa_n", 0) > 0:
                sd = ck["wa_model"]
            elif ck["args"].get("wa"):
                start = (ck["args"]["milestones"] or [0])[0] + 1
                raise SystemExit(f"error: {path} holds no averaged weights yet (epoch {ck['epoch']}; "
                                 f"{ck['args']['wa_mode']} averages from epoch {start}); evaluate --weights model, or "
                                 f"train past epoch {start - 1}")
            else:
                raise SystemExit(f"error: {path} holds no weight average (trained without --wa); drop --weights wa")
        else:
            sd = ck["model"]
        data_dir = args.data_dir or ck["args"].get("data_dir", "data")
        method = "natural" if ck["args"].get("eps", 1) == 0 else ck["method"]  # --eps 0: no attack in training
        info = dict(epoch=ck["epoch"], method=method, weights=ck.get("weights", args.weights),
                    num_classes=ck["num_classes"], in_channels=ck.get("in_channels", 3))
    else:
        if args.arch is None or args.dataset is None:
            raise SystemExit(f"error: {path} is not a checkpoint of this project; pass --arch and --dataset to "
                             f"read it as a bare state dict")
        if args.weights == "wa":
            raise SystemExit(f"error: --weights wa needs a checkpoint of this project; {path} is a bare state dict")
        utils.require(args.dataset in data.DATASETS,
                      f"unknown dataset {args.dataset!r}; choose one of {', '.join(data.DATASETS)}")
        arch, dataset, data_dir = args.arch, args.dataset, args.data_dir or "data"
        sd = ck
        for key in ("state_dict", "model_state_dict"):  # common wrappers of other projects
            if isinstance(ck, dict) and isinstance(ck.get(key), dict):
                sd = ck[key]
        info = dict(num_classes=data.NUM_CLASSES.get(dataset, 10), in_channels=data.CHANNELS.get(dataset, 3))
    model = models.get_model(arch, info["num_classes"], info["in_channels"])
    utils.load_weights(model, sd, path, arch)
    info.update(arch=arch, dataset=dataset, data_dir=data_dir)
    return model.to(device).eval(), info


def run_folder_checkpoint(path):
    """A run folder stands for its best.pt (said so); a folder without one is refused, naming what it holds."""
    if not os.path.isdir(path):
        return path
    best = os.path.join(path, "best.pt")
    if os.path.isfile(best):
        print(f"{path} is a run folder: evaluating its best.pt")
        return best
    held = sorted(f for f in os.listdir(path) if f.endswith(".pt") and ".eval." not in f)
    raise SystemExit(f"error: {path} is a folder without best.pt; pass one of its checkpoints "
                     f"({', '.join(held) if held else 'it holds none'})")


def fingerprint(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def result_files(path, args):
    """(NAME.eval.json, NAME.eval.pt) beside the checkpoint, or under --results-dir/<checkpoint's folder>/."""
    folder = os.path.dirname(os.path.abspath(path))
    if args.results_dir:
        folder = os.path.join(args.results_dir, os.path.basename(folder))
    stem = os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + (".wa" if args.weights == "wa" else ""))
    return stem + ".eval.json", stem + ".eval.pt"


def read_results(json_path, store_path, fp, info):
    """The stored record and per-image results of this checkpoint file; those of an older file (another
    fingerprint) are moved aside, not mixed in. Returns (record, store)."""
    record, store = None, {"fingerprint": fp, "attacks": {}}
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {json_path} ({e}); move it away to start a fresh record") from None
    if os.path.exists(store_path):
        s = utils.load_checkpoint(store_path)
        if isinstance(s, dict) and "attacks" in s:
            store = s
    old = (record or {}).get("fingerprint") or store.get("fingerprint")
    if old and old != fp:
        tag = f"epoch{(record or {}).get('epoch', 'unknown')}-{old[:8]}"
        for p in (json_path, store_path):
            if os.path.exists(p):
                os.replace(p, os.path.join(os.path.dirname(p), os.path.basename(p).replace(".eval.", f".eval.{tag}.")))
        print(f"  the checkpoint has changed since its results were written: the old results were moved to "
              f"{os.path.basename(json_path).replace('.eval.', f'.eval.{tag}.')} (and .pt)")
        record, store = None, {"fingerprint": fp, "attacks": {}}
    record = record or {}
    record.update(info, fingerprint=fp)
    record.setdefault("results", {})
    store["fingerprint"] = fp
    return record, store


def attack_key(name, args, n):
    steps = {"pgd": args.pgd_steps, "cw": args.cw_steps}.get(name)
    desc = attacks.describe(name, args.eps, steps, args.alpha, args.norm, args.restarts)
    key = f"{desc} | first {n} test images" + ("" if name == "clean" else f" | seed {args.seed}")
    return key, desc


def chunk_correct(model, name, xb, yb, args, state=None, save=None):
    """Per-image correctness of one chunk under one attack. AutoAttack keeps its progress in `state` after each of
    its components (save() writes it), so a killed evaluation continues inside the chunk."""
    if name == "clean":
        return attacks.correct(model, xb, yb, len(xb))
    if name == "fgsm":
        return attacks.correct(model, xb, yb, len(xb), attack=attacks.fgsm, eps=args.eps, norm=args.norm)
    if name == "aa":
        return attacks.autoattack(model, xb, yb, args.eps, args.norm, len(xb), args.seed,
                                  log=lambda m: (sys.stderr.write(m + "\n"), sys.stderr.flush()), state=state,
                                  save=save)
    ok = torch.ones(len(yb), dtype=torch.bool, device=yb.device)
    for _ in range(args.restarts):
        ok &= attacks.correct(model, xb, yb, len(xb), attack=attacks.pgd, eps=args.eps, alpha=args.alpha,
                              steps=args.pgd_steps if name == "pgd" else args.cw_steps, random_start=True,
                              loss="ce" if name == "pgd" else "cw", norm=args.norm)
    return ok


def run_attack(model, name, x, y, args, store, save):
    """Runs one attack chunk by chunk (--batch-size images), skipping chunks already done, saving after each.
    Returns the store entry: per-image `correct`, per-chunk `done`, the settings and the time spent."""
    n, chunk = len(y), args.batch_size
    key, desc = attack_key(name, args, n)
    n_chunks = math.ceil(n / chunk)
    entry = store["attacks"].get(key)
    if entry is not None and (args.redo or (not bool(entry["done"].all()) and entry["chunk"] != chunk)):
        if not args.redo:
            raise SystemExit(f"error: an interrupted {desc} evaluation used --batch-size {entry['chunk']}; run it "
                             f"again with --batch-size {entry['chunk']} to resume it, or with --redo to start over")
        entry = None
    if entry is None:
        entry = dict(name=name, attack=desc, n_examples=n, seed=args.seed, chunk=chunk, seconds=0.0,
                     correct=torch.zeros(n, dtype=torch.bool), done=torch.zeros(n_chunks, dtype=torch.bool))
        store["attacks"][key] = entry
    if bool(entry["done"].all()):
        return key, entry, False
    t0, done_before = time.time(), int(entry["done"].sum())
    for c in range(n_chunks):
        if entry["done"][c]:
            continue
        s, e = c * chunk, min(n, (c + 1) * chunk)
        # the chunk's randomness is a function of (seed, attack, chunk): the same whether or not the run was resumed
        torch.manual_seed(args.seed * 1_000_003 + zlib.crc32(name.encode()) + c)
        t_chunk = time.time()
        parts = entry.setdefault("parts", {})  # AutoAttack's per-component progress in the unfinished chunk
        entry["correct"][s:e] = chunk_correct(model, name, x[s:e], y[s:e], args, parts.setdefault(c, {}),
                                              save).cpu()
        parts.pop(c, None)
        entry["done"][c] = True
        entry["seconds"] = round(entry["seconds"] + time.time() - t_chunk, 2)
        if bool(entry["done"].all()):
            entry["date"] = utils.now()  # when the result was completed
        save()
        done_images = torch.repeat_interleave(entry["done"], chunk)[:n]
        acc = 100 * entry["correct"][done_images].float().mean().item()
        elapsed = time.time() - t0
        left = elapsed / (int(entry["done"].sum()) - done_before) * int((~entry["done"]).sum())
        sys.stderr.write(f"  {desc}: {int(done_images.sum())}/{n} images, {acc:.2f} % so far, {elapsed:.0f} s, "
                         f"~{left:.0f} s left\n")
        sys.stderr.flush()
    return key, entry, True


def worst_key(n):
    return f"worst case | first {n} test images"


def summary(store, n):
    """The JSON view of the complete stored attacks: {key: entry without per-image data}, plus the worst case over
    every complete attack on the same first n images (when two or more attacks are stored for them)."""
    results, worst, used = {}, torch.ones(n, dtype=torch.bool), []
    for key, e in store["attacks"].items():
        if not bool(e["done"].all()):
            continue
        acc = round(100 * e["correct"].float().mean().item(), 4)
        results[key] = dict(name=e["name"], attack=e["attack"], accuracy=acc, n_examples=e["n_examples"],
                            seed=e["seed"], date=e.get("date"), seconds=e["seconds"])
        if e["n_examples"] == n:
            worst &= e["correct"]
            used.append(e)
    if sum(e["name"] != "clean" for e in used) >= 2:
        names = ", ".join(e["attack"].split(" (")[0] + ("" if e["seed"] == used[0]["seed"] else f" seed {e['seed']}")
                          for e in used)
        results[worst_key(n)] = dict(
            name="worst", attack=f"worst case over: {names} (per image)",
            accuracy=round(100 * worst.float().mean().item(), 4), n_examples=n, seed=None, date=utils.now(),
            seconds=0.0)
    return results


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    out, spectra, first_json = {}, [], None
    args.checkpoints = [run_folder_checkpoint(p) for p in args.checkpoints]
    # every results folder (and the picture's) must be writable before any work starts
    for path in args.checkpoints:
        utils.check_writable(os.path.dirname(result_files(path, args)[0]), "--results-dir")
    if args.spectrum and args.spectrum_out:
        utils.check_writable(os.path.dirname(os.path.abspath(args.spectrum_out)), "--spectrum-out")
    for path in args.checkpoints:
        model, info = load_model(path, args, device)
        json_path, store_path = result_files(path, args)
        first_json = first_json or json_path
        fp = fingerprint(path)
        ds = data.load(info["dataset"], info["data_dir"], val_size=0, device=device)
        n = min(args.n_examples, len(ds["test_x"]))
        x, y = ds["test_x"][:n], ds["test_y"][:n]
        weights = info.get("weights", args.weights)
        print(f"{path}: {info['arch']} ({info.get('method', 'state dict')}, {weights} weights, "
              f"epoch {info.get('epoch', '?')}), {info['dataset']} test, first {n} images"
              + (f" (all there are; --n-examples {args.n_examples} asked for more)" if n < args.n_examples else ""))
        record, store = read_results(json_path, store_path, fp, dict(checkpoint=path, **info))
        utils.remove_stale_temp_files(os.path.dirname(json_path))

        def save():  # per-image results after every chunk, the JSON view after every attack; both atomic
            utils.save_checkpoint(store, store_path)

        ran = {}
        for name in args.attacks:
            key, entry, computed = run_attack(model, name, x, y, args, store, save)
            # entries without per-image data (older files) stay; the stored attacks' entries are brought up to date
            record["results"] = {**record["results"], **summary(store, n)}
            utils.write_json(record, json_path)
            r = record["results"][key]
            ran[name] = r
            when = "" if computed else f"   (stored {r['date']}; --redo runs it again)"
            print(f"  {r['attack']:<66} {r['accuracy']:6.2f} %  {r['seconds']:8.1f} s{when}", flush=True)
        if args.attacks and worst_key(n) in record["results"]:
            r = record["results"][worst_key(n)]
            ran["worst"] = r
            print(f"  {r['attack']}: {r['accuracy']:.2f} %")
        pgd_name = attacks.describe("pgd", args.eps, args.pgd_steps, args.alpha, args.norm)
        if args.lowpass:
            torch.manual_seed(args.seed)
            ks = spectral.lowpass_ks(x.shape[-1])
            lp = spectral.lowpass_accuracy(model, x, y, ks, args.eps, args.alpha, args.pgd_steps, args.batch_size,
                                           window=args.lowpass_window)
            print(f"  low-pass k x k ({args.lowpass_window} window)   clean %    PGD %   ({pgd_name}, crafted on "
                  f"unfiltered images)")
            for k, (c, r) in lp.items():
                print(f"  k = {k:<28} {c:7.2f}  {r:7.2f}")
            key = f"{pgd_name} | {args.lowpass_window} window | first {n} test images | seed {args.seed}"
            record.setdefault("lowpass", {})[key] = dict(
                attack=pgd_name, window=args.lowpass_window, n_examples=n, seed=args.seed, date=utils.now(),
                accuracy={str(k): dict(clean=round(c, 4), pgd=round(r, 4)) for k, (c, r) in lp.items()})
            utils.write_json(record, json_path)
        if args.spectrum:
            torch.manual_seed(args.seed)
            spec, prof = spectral.perturbation_spectrum(model, x, y, args.eps, args.alpha, args.pgd_steps,
                                                        args.batch_size)
            print("  perturbation spectrum, radial profile (low to high frequency): "
                  + " ".join(f"{v:.3g}" for v in prof.tolist()))
            key = f"{pgd_name} | first {n} test images | seed {args.seed}"
            record.setdefault("spectrum", {})[key] = dict(
                attack=pgd_name, n_examples=n, seed=args.seed, date=utils.now(),
                amplitude=utils.tidy(spec.tolist(), 5), radial_profile=utils.tidy(prof.tolist(), 5))
            utils.write_json(record, json_path)
            label = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
            spectra.append((label + (" (wa)" if args.weights == "wa" else ""), spec, prof))
        print(f"  results: {json_path}")
        out[path] = dict(record, ran=ran)
    if spectra:
        png = args.spectrum_out or os.path.splitext(os.path.splitext(first_json)[0])[0] + ".spectrum.png"
        spectral.plot_spectra(spectra, png)
        print(f"perturbation spectra: {png}")
    return out


if __name__ == "__main__":
    utils.cli(main)
