"""The speed table in one command: every method's own --bench over networks and precisions.

    python bench.py                       # on a GPU: at, sar, iseat x PreActResNet-18, WRN-34-10 x fp32, bf16,
                                          # bf16 + compile at batch 128, and the largest batch at.py fits
    python bench.py --methods at sar iseat trades mart --archs preact_resnet18
    python bench.py --peak-tflops 989     # the dense bf16 peak of a GPU the table below does not know
    python bench.py --quick               # the tiny configuration (cnn, 2 batches of 32), what a CPU runs
    python bench.py --networks            # every network's parameters and forward GFLOPs per 32-px image
    python bench.py --recipe wang2023     # the same runs with the leaderboard's recipe (every method's --recipe)

Each configuration runs `python METHOD.py --bench ...` (2 epochs of --max-batches batches of synthetic CIFAR-shaped
data; the second epoch is timed, so cudnn autotuning and compilation are not counted) in a process of its own, so
an out-of-memory try cannot disturb the next one, and reads the images/s it prints. Printed, and written as JSON
(--out): images/s, the achieved TFLOP/s (the model's forward FLOPs, counted here by torch.utils.flop_counter, x the
method's forward-equivalents per image, PASSES), the fraction of the GPU's dense bf16 peak, the time of a
50,000-image CIFAR-10 epoch at that speed, and each method's step time relative to at.py (at's images/s over the
method's). On a CPU the tiny configuration runs (in this process), for the tests.
The default GPU set is sized to finish within about 10 minutes on one H100.
"""
import argparse
import contextlib
import functools
import importlib
import io
import os
import re
import subprocess
import sys
import time

import torch

import cmdline
import models

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first match wins
PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
         ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0))
MODES = ("fp32", "bf16", "bf16+compile")
LINE = re.compile(r"benchmark: ([0-9.]+) images/s")  # what a method file prints under --bench
# forward-equivalents per image of a training step with PGD-10 (a forward + input gradient counts 2, a forward +
# backward of the training pass 3): PGD-AT 2*10 + 3; SAR + a clean training pass; TRADES + the clean target of its
# attack and a clean pass; MART + a clean pass; ISEAT + a clean pass and the AWP proxy's forward-backward
PASSES = {"at": 23, "sar": 26, "trades": 27, "mart": 26, "iseat": 29}


@functools.lru_cache(maxsize=None)
def gflop_per_image(arch, size=32, channels=3):
    """The network's forward GFLOP for one image (models.gflops: torch's FLOP counter on the meta device)."""
    return models.gflops(arch, (channels, size, size))


def networks_table():
    """Every network of models.py: parameters at 10 classes and forward GFLOPs per 32-px 3-channel image."""
    lines = ["| `--arch` | parameters (10 classes) | GFLOPs per 32-px image |", "|---|---|---|"]
    for arch in models.ARCHS:
        with torch.device("meta"):
            n = sum(p.numel() for p in models.get_model(arch, 10).parameters())
        lines.append(f"| `{arch}` | {n:,} | {gflop_per_image(arch):.3g} |")
    return "\n".join(lines)


def get_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="The GPU speed table: every method's --bench, in one command")
    p.add_argument("--quick", action="store_true", default=not cuda,
                   help="the tiny configuration (cnn, batch 32, 2 batches); on without a GPU")
    p.add_argument("--methods", nargs="+", default=None, help="None: at sar iseat (quick: + trades mart)")
    p.add_argument("--archs", nargs="+", default=None, choices=models.ARCHS,
                   help="None: preact_resnet18 wrn34_10 (quick: cnn)")
    p.add_argument("--networks", action="store_true", help="print every network's parameters and GFLOPs, and stop")
    p.add_argument("--recipe", choices=["wang2023"], help="every run with this training recipe (the methods' flag)")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES,
                   help="None: all three (quick: fp32; a CPU has no fast bf16)")
    p.add_argument("--batch-size", type=int, default=None, help="None: 128 (quick: 32)")
    p.add_argument("--max-batches", type=int, default=None, help="timed batches per configuration (None: 30, "
                                                                   "WRN 10; quick: 2)")
    p.add_argument("--largest-batch", nargs="*", type=int, default=None,
                   help="batch sizes at.py tries in turn until one does not fit (bf16, or the first of --modes "
                        "without it; default 256 .. 8192, WRN up to 2048; quick: 64 128); empty: skip")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this device")
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--out", default=os.path.join("runs", "bench.json"), help="the JSON of the runs and the tables")
    args = cmdline.parse_args(p, argv)
    q = args.quick
    args.methods = args.methods or (["at", "sar", "iseat", "trades", "mart"] if q else ["at", "sar", "iseat"])
    args.archs = args.archs or (["cnn"] if q else ["preact_resnet18", "wrn34_10"])
    args.modes = args.modes or (["fp32"] if q else list(MODES))
    args.batch_size = args.batch_size or (32 if q else 128)
    cmdline.require(all(m in ("at", "sar", "iseat", "trades", "mart") for m in args.methods),
                  f"--methods {' '.join(args.methods)}: choose among at sar iseat trades mart")
    cmdline.require(args.batch_size >= 1 and (args.max_batches is None or args.max_batches >= 1),
                  "--batch-size and --max-batches must be positive")
    cmdline.check_device(args.device)
    return args


def peak_of(name, override):
    if override:
        return override, "given"
    for key, tflops in PEAKS:
        if key in name:
            return tflops, key
    return None, None


def run_one(method, arch, mode, batch, max_batches, device, in_process, recipe=None):
    """One --bench run; returns {img_per_s, tflops} or {error}."""
    argv = ["--bench", "--dataset", "synthetic", "--arch", arch, "--batch-size", str(batch),
            "--max-batches", str(max_batches), "--device", device] + (["--recipe", recipe] if recipe else [])
    argv += ["--amp"] if mode != "fp32" else []
    argv += ["--compile"] if mode == "bf16+compile" else []
    t0 = time.time()
    if in_process:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            importlib.import_module(method).main(argv)
        out, rc = buf.getvalue(), 0
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run([sys.executable, os.path.join(here, f"{method}.py")] + argv, capture_output=True,
                           text=True, timeout=900)
        out, rc = r.stdout + r.stderr, r.returncode
    m = LINE.search(out)
    if rc != 0 or not m:
        oom = "out of memory" in out.lower() or "OutOfMemoryError" in out
        last = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return dict(error="out of memory" if oom else last[0][:200], seconds=round(time.time() - t0, 1))
    img_per_s, gflop = float(m.group(1)), gflop_per_image(arch)
    return dict(img_per_s=img_per_s, gflop_per_image=float(f"{gflop:.6g}"), forward_equivalents=PASSES[method],
                tflops=round(img_per_s * gflop * PASSES[method] / 1000, 4), seconds=round(time.time() - t0, 1))


def rate(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def markdown(res, args, device_name, peak):
    """The README's tables: at.py per network and precision; every method's images/s and ratio to at.py."""
    top = MODES[-1] if MODES[-1] in args.modes else args.modes[-1]
    lines = [f"Device: {device_name}; dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'unknown'}; "
             f"batch {args.batch_size}; {cmdline.now()[:10]}", "",
             "| model | " + " | ".join(f"at.py {m} (img/s)" for m in args.modes)
             + f" | largest batch, {res['largest_batch_mode']} (img/s) | TFLOP/s ({top}) | fraction of peak "
             f"| 50k-image epoch |",
             "|---|" + "---|" * (len(args.modes) + 4)]
    for arch in args.archs:
        row = res["runs"].get("at", {}).get(arch, {})
        cells = [rate(row[m]['img_per_s']) if "img_per_s" in row.get(m, {}) else row.get(m, {}).get("error", "")
                 for m in args.modes]
        lb = res["largest_batch"].get(arch)
        lb_cell = f"{lb['batch']} ({rate(lb['img_per_s'])})" if lb and "img_per_s" in lb else ""
        best = row.get(top, {})
        frac = f"{best['tflops'] / peak:.1%}" if peak and "tflops" in best else ""
        epoch = f"{50000 / best['img_per_s']:.1f} s" if "img_per_s" in best else ""
        if epoch and args.quick:
            epoch += " (rough: from a few batches)"
        lines.append(f"| {arch} | " + " | ".join(cells)
                     + f" | {lb_cell} | {best.get('tflops', '')} | {frac} | {epoch} |")
    lines += ["", "| method | model | " + " | ".join(f"{m} img/s (x at step time)" for m in args.modes) + " |",
              "|---|---|" + "---|" * len(args.modes)]
    for method in args.methods:
        for arch in args.archs:
            cells = []
            for m in args.modes:
                r = res["runs"].get(method, {}).get(arch, {}).get(m, {})
                ratio = res["ratios"].get(method, {}).get(arch, {}).get(m)
                cells.append(f"{rate(r['img_per_s'])} ({ratio:.2f})" if "img_per_s" in r and ratio
                             else rate(r["img_per_s"]) if "img_per_s" in r else r.get("error", ""))
            lines.append(f"| {method} | {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = get_args(argv)
    if args.networks:
        table = networks_table()
        print(table)
        return table
    t_start = time.time()
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    peak, peak_key = peak_of(device_name, args.peak_tflops)
    in_process = args.quick and not args.device.startswith("cuda")
    cmdline.check_writable(os.path.dirname(os.path.abspath(args.out)))
    res = dict(device=device_name, peak_bf16_tflops=peak, peak_source=peak_key, batch_size=args.batch_size,
               date=cmdline.now(), runs={}, ratios={}, largest_batch={})
    for arch in args.archs:
        k = args.max_batches or (2 if args.quick else 10 if arch.startswith("wrn") else 30)
        for method in args.methods:
            for mode in args.modes:
                r = run_one(method, arch, mode, args.batch_size, k, args.device, in_process=in_process,
                            recipe=args.recipe)
                res["runs"].setdefault(method, {}).setdefault(arch, {})[mode] = r
                shown = (f"{r['img_per_s']:.1f} images/s x {r['gflop_per_image']:.3g} GFLOP/image x "
                         f"{r['forward_equivalents']} forward-equivalents = {r['tflops']:.3g} TFLOP/s"
                         if "img_per_s" in r else r["error"])
                print(f"{method:>6} {arch:<16} {mode:<13} {shown}   ({r['seconds']:.0f} s)", flush=True)
    for method in args.methods:  # step time relative to at.py: at's images/s over the method's
        for arch in args.archs:
            for mode in args.modes:
                a = res["runs"].get("at", {}).get(arch, {}).get(mode, {})
                b = res["runs"][method][arch][mode]
                if "img_per_s" in a and "img_per_s" in b:
                    res["ratios"].setdefault(method, {}).setdefault(arch, {})[mode] = round(
                        a["img_per_s"] / b["img_per_s"], 3)
    lb_mode = "bf16" if "bf16" in args.modes else args.modes[0]
    res["largest_batch_mode"] = lb_mode
    for arch in args.archs:  # the largest batch at.py fits, and its speed
        tries = args.largest_batch if args.largest_batch is not None else (
            [64, 128] if args.quick else [256, 512, 1024, 2048] + ([] if arch.startswith("wrn") else [4096, 8192]))
        for b in tries:
            r = run_one("at", arch, lb_mode, b, 2 if args.quick else 5, args.device, in_process=in_process,
                        recipe=args.recipe)
            print(f"    at {arch:<16} {lb_mode} batch {b:<6} "
                  + (f"{r['img_per_s']:.1f} images/s" if "img_per_s" in r else r["error"]), flush=True)
            if "img_per_s" not in r:
                break
            res["largest_batch"][arch] = dict(batch=b, **r)
    res["seconds"] = round(time.time() - t_start, 1)
    res["markdown"] = markdown(res, args, device_name, peak)
    print()
    print(res["markdown"])
    cmdline.write_json(res, args.out)
    print(f"\n{res['seconds']:.0f} s in all; written to {args.out}")
    return res


if __name__ == "__main__":
    cmdline.cli(main)
