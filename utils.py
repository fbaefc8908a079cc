"""Checkpoint I/O, the per-epoch log and a progress line: the plumbing every script shares.

Checkpoints are written atomically (temp file, fsync, rename) and read with torch.load(weights_only=True), so a
killed run never leaves a half-written file and nothing but tensors and plain values is ever unpickled.
"""
import json
import os
import pickle
import sys
import time
import zipfile

import torch
import torch.distributed as dist

CKPT_FORMAT = "advtrain-checkpoint-v1"


def fraction(s):
    """argparse type for radii and steps: '8/255' or a plain number, both in [0,1] pixel units."""
    try:
        num, _, den = s.partition("/")
        return float(num) / float(den or 1)
    except ValueError:
        raise ValueError(f"{s!r} is not a number or a fraction like 8/255") from None


def save_checkpoint(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load with weights_only=True; every failure is one line naming the problem and the fix."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"error: refusing to load {path}: it holds Python objects other than tensors and plain "
                         f"values (read with weights_only=True); re-save it as a plain state dict") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path}: the file is truncated or not a torch checkpoint "
                         f"({str(e).splitlines()[0][:100]}); use an intact copy") from e


def clean_state_dict(sd):
    """Accepts what other code saves: DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes,
    AveragedModel's `n_averaged`, and the unused `sub_block1` of TRADES WideResNet checkpoints."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        if k != "n_averaged" and not k.startswith("sub_block1."):
            out[k] = v
    return out


def load_weights(model, sd, what, arch):
    """load_state_dict(strict) with a one-line error when the checkpoint is of another architecture."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"error: {what} is not a state dict of tensors; pass a checkpoint written by this project "
                         f"or a plain model.state_dict()")
    sd = clean_state_dict(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        show = lambda ks: ", ".join(ks[:3]) + (", ..." if len(ks) > 3 else "")
        raise SystemExit(f"error: {what} does not fit arch {arch!r}: {len(missing)} missing keys ({show(missing)}), "
                         f"{len(unexpected)} unexpected ({show(unexpected)}), {len(shapes)} of another shape "
                         f"({show(shapes)}); pass the --arch and --dataset it was trained with")
    model.load_state_dict(sd)


def log_epoch(out_dir, record):
    """One printed line and one JSON object per epoch (log.jsonl in the output folder)."""
    parts = []
    for k, v in record.items():
        if v is None:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    print(" | ".join(parts), flush=True)
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(out_dir, start_epoch):
    """On resume, drop log lines of epochs that are about to be run again (a run killed after logging)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= start_epoch]
    with open(path, "w") as f:
        f.writelines(keep)


def forward_gflops(model, x):
    """GFLOP of one forward per image (torch.utils.flop_counter: 2 per multiply-add in convolutions and matmuls).
    A training pass (forward + backward) costs about 3 of these, a PGD step (input gradient only) about 2."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / len(x) / 1e9


def progress(i, n, t0, prefix=""):
    """A self-overwriting progress line on a terminal; reads no GPU value, so it costs no host sync."""
    if sys.stderr.isatty() and (i % 10 == 0 or i == n):
        sys.stderr.write(f"\r{prefix} {i}/{n} batches, {time.time() - t0:.0f} s" + (" " * 8 + "\r" if i == n else ""))
        sys.stderr.flush()


# ---- several processes (torchrun): one process per GPU, or per CPU process with the gloo backend

def distributed_setup(device):
    """Under torchrun (WORLD_SIZE > 1) joins the process group and picks this rank's GPU.
    Returns (device, rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world == 1:
        return device, 0, 1
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def distributed_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def reduce_sum(*values, device="cpu"):
    """Sums numbers or 0-d tensors over all ranks (once per epoch); returns Python floats."""
    t = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float64) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(*modules):
    """Rank 0's buffers (BatchNorm statistics) to every rank, so all ranks hold one model."""
    if dist.is_initialized():
        for m in modules:
            if m is not None:
                for b in m.buffers():
                    dist.broadcast(b, 0)
