"""The command-line plumbing that eval.py, report.py, bench.py and vulnerability.py share: argparse errors as one line,
flag checks, output folders, JSON written atomically, the entry point. The training scripts carry their own copy of
the few pieces they need, so that a method file runs with models.py, data.py, attacks.py and wa.py alone."""
import argparse
import datetime
import json
import math
import os
import re

import torch
import torch.distributed as dist

import models


def parse_args(parser, argv=None):
    """parser.parse_args, with every argparse error as one line (no usage block). Negative fractions (-8/255) are
    read as values, not as unknown flags, so that the range checks can name the problem."""
    def error(message):
        raise SystemExit(f"error: {message} (--help lists the flags)")
    parser.error = error
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # --help shows every default
    if hasattr(parser, "_negative_number_matcher"):  # the method files' pattern (Python 3.13's argparse)
        parser._negative_number_matcher = re.compile(r"^-\.?\d")
    return parser.parse_args(argv)


def require(ok, message):
    if not ok:
        raise SystemExit(f"error: {message}")


def check_device(name):
    """--device: a torch device that exists on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(),
                f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
        require(device.index is None or device.index < torch.cuda.device_count(),
                f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible; use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}")
    return device


def check_writable(folder, flag="--out"):
    """Creates `folder` and proves a file can be written there, before any work starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write to {folder} ({e.strerror}); pass {flag} to a writable folder") from None


def write_json(obj, path):
    models.atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


def tidy(value, digits=6):
    """Rounds floats to `digits` significant digits (no 7.999999821186066 or 0.010000000000000002 in the logs)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: tidy(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(v, digits) for v in value]
    return value


def now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def read_log(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cli(main):
    """Entry point of eval.py, report.py, bench.py and vulnerability.py: a SystemExit with a message, or the modules'
    InputError, prints that one line (once under torchrun: every process runs the same checks); any other error
    shows its traceback."""
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; run the same command again to continue where it stopped") from None
    except (SystemExit, models.InputError) as e:
        line = f"error: {e}" if isinstance(e, models.InputError) else e.code
        raise SystemExit(1 if isinstance(line, str) and os.environ.get("RANK", "0") != "0" else line) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
