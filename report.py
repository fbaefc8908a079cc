"""The comparison table and the training curves of a set of runs, from what the runs and eval.py wrote.

    python report.py runs/*                         # runs/report/report.md, report.csv and curves.png
    python report.py runs/sar-* runs/at-* --out results

Table: one row per run and checkpoint (best.pt, last.pt, wa_best.pt, and last.pt's weight average when it was
evaluated): method, network, data set, epochs trained, the epoch the checkpoint holds, its validation clean and PGD
accuracy, and every eval.py result found beside it (NAME.eval.json): clean, FGSM, PGD, CW, AutoAttack and the
per-image worst case, and eval.py --checks' verdict (all pass / which checks warned). A row shows its attacks at one
radius (the training radius where they were run at it, else the radius with the most results) and on the same
images where it can: the largest number of first test images every attack of the row was run on (then the newest
result), so the worst case covers them all; a cell on other images says so ("other images: first N"). Each attack's
settings and number of images are given below the table (numbered where the rows differ); the CSV carries them in
every row. Missing cells stay empty.

Curves (PNG): validation PGD and clean accuracy per epoch for every run, one colour per run, the weight average
dashed, the lr milestones as dotted vertical lines in the run's colour; train loss and the method's own term (SAR's
spectral term, ISEAT's smoothing, the TRADES / MART KL) in a third panel.
"""
import argparse
import csv
import glob
import io
import json
import os

import checks
import cmdline
import models

CHECKPOINTS = (("best.pt", "model", "best"), ("last.pt", "model", "last"), ("wa_best.pt", "model", "wa best"),
               ("last.pt", "wa", "last, wa"))
ATTACK_COLUMNS = (("clean", "clean"), ("fgsm", "FGSM"), ("pgd", "PGD"), ("cw", "CW"), ("aa", "AutoAttack"),
                  ("worst", "worst case"))
TERMS = {"train_sar": "SAR term", "train_smooth": "smoothing term", "train_kl": "KL term"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Comparison table and training curves of training runs")
    p.add_argument("runs", nargs="+", help="run folders (each with log.jsonl and checkpoints)")
    p.add_argument("--out", default=os.path.join("runs", "report"), help="folder for report.md, report.csv and "
                                                                            "curves.png")
    args = cmdline.parse_args(p, argv)
    return args


def radius_of(results, train_eps=None):
    """The radius (norm, eps) a row shows: the training radius where an attack was evaluated at it, else the radius
    with the most results (then the newest). Results written before radii were stored form their own group."""
    radii = {}
    for r in results.values():
        if r.get("name") not in (None, "clean"):
            radii.setdefault((r.get("norm"), r.get("eps")), []).append(r)
    for norm, eps in radii:
        if train_eps and norm == "Linf" and eps is not None and abs(eps - train_eps) < 1e-9:
            return norm, eps
    return max(radii, key=lambda k: (len(radii[k]), max(r.get("date") or "" for r in radii[k])), default=None)


def pick_row(results, train_eps=None):
    """One stored result per attack column, at one radius (radius_of) and all on the same images where they can
    be: the largest number of first test images on which every attack of the row was run (then the newest); the
    worst case is then the one over those images. An attack without a result on that set shows its result on the
    most images, and its cell says on how many (with no set common to all, the largest set is the row's). Returns
    ({column: result or None}, the row's number of images or None)."""
    radius = radius_of(results, train_eps)
    results = {k: r for k, r in results.items()
               if r.get("name") == "clean" or (r.get("norm"), r.get("eps")) == radius}
    attacks_run = {r["name"] for r in results.values() if r.get("name") not in (None, "worst")}
    sizes = {r["n_examples"] for r in results.values()}
    shared = [k for k in sizes if all(any(r.get("name") == a and r["n_examples"] == k for r in results.values())
                                      for a in attacks_run)]
    n_row = max(shared) if shared else (max(sizes) if sizes else None)
    row = {}
    for name, _ in ATTACK_COLUMNS:
        found = [r for r in results.values() if r.get("name") == name]
        on_row = [r for r in found if r["n_examples"] == n_row]
        row[name] = max(on_row or found, key=lambda r: (r["n_examples"], r.get("date") or "")) if found else None
    return row, n_row


def pick_checks(found, radius):
    """The newest eval.py --checks record at the row's radius (then on the most images), or None."""
    at = [c for c in found.values() if radius is None or (c["norm"], c["eps"]) == radius]
    return max(at, key=lambda c: (c["date"], c["n_examples"])) if at else None


def checks_cell(c, images=True):
    if c is None:
        return ""
    warned = [str(i) for i, v in enumerate(c["checks"], 1) if v["status"] == "WARN"]
    return (f"WARN {', '.join(warned)}" if warned else f"all {len(c['checks'])} pass") + (
        f" ({c['n_examples']} images)" if images else "")


def rows_of(run, log):
    """One row per checkpoint of the run that exists (each file read once), and the run's lr milestones."""
    rows, cks = [], {}
    for fname, weights, label in CHECKPOINTS:
        path = os.path.join(run, fname)
        if not os.path.exists(path):
            continue
        stem = os.path.splitext(path)[0] + (".wa" if weights == "wa" else "")
        results, found = {}, {}
        if os.path.exists(stem + ".eval.json"):
            with open(stem + ".eval.json") as f:
                record = json.load(f)
            results, found = record.get("results", {}), record.get("checks", {})
        if weights == "wa" and not results:
            continue  # last.pt's average appears only when it was evaluated
        if fname not in cks:
            cks[fname] = models.load_checkpoint(path, mmap=True)
        ck = cks[fname]
        if not isinstance(ck, dict) or ck.get("format") != models.CKPT_FORMAT:
            continue
        a, m = ck["args"], ck.get("metrics") or {}
        prefix = "wa_" if (weights == "wa" or ck.get("weights") == "wa") else ""
        method = "natural" if a.get("eps", 1) == 0 else ck["method"]  # at.py --eps 0 trains without an attack
        row = dict(run=os.path.basename(os.path.normpath(run)), checkpoint=label, method=method,
                   network=ck["arch"], dataset=ck["dataset"], epochs=f"{len(log)}/{a['epochs']}", epoch=ck["epoch"],
                   val_clean=m.get(prefix + "val_clean"), val_pgd=m.get(prefix + "val_pgd"),
                   val_attack=f"PGD-{a.get('val_steps', a.get('steps'))}" if a.get("eps", 1) > 0 else "")
        picked, row["n_row"] = pick_row(results, a.get("eps"))
        row.update(picked)
        row["checks"] = pick_checks(found, radius_of(results, a.get("eps")))
        rows.append(row)
    last = cks.get("last.pt") or (models.load_checkpoint(os.path.join(run, "last.pt"), mmap=True)
                                  if os.path.exists(os.path.join(run, "last.pt")) else {})
    milestones = last.get("args", {}).get("milestones", []) if isinstance(last, dict) else []
    return rows, milestones


def fmt(v, digits=2):
    return "" if v is None else f"{v:.{digits}f}"


def table(rows):
    """Markdown table + the legend of attack settings; and the CSV text."""
    legend, notes = [], {}
    for name, title in ATTACK_COLUMNS:
        settings = sorted({(r[name]["attack"], r[name]["n_examples"]) for r in rows if r[name]})
        if len(settings) == 1:
            legend.append(f"- {title}: {settings[0][0]}, first {settings[0][1]} test images")
        elif settings:
            for i, s in enumerate(settings, 1):
                notes[(name, s)] = f"{name}{i}"
                legend.append(f"- [{name}{i}] {title}: {s[0]}, first {s[1]} test images")
    head = ["run", "checkpoint", "method", "network", "data set", "epochs", "epoch", "val clean", "val PGD"]
    head += [title for _, title in ATTACK_COLUMNS] + ["checks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["checkpoint"], r["method"], r["network"], r["dataset"], r["epochs"], str(r["epoch"]),
                 fmt(r["val_clean"]), fmt(r["val_pgd"]) + (f" ({r['val_attack']})" if r["val_pgd"] is not None else "")]
        for name, _ in ATTACK_COLUMNS:
            res = r[name]
            note = notes.get((name, (res["attack"], res["n_examples"]))) if res else None
            other = res is not None and r["n_row"] is not None and res["n_examples"] != r["n_row"]
            cells.append("" if res is None else fmt(res["accuracy"]) + (f" [{note}]" if note else "")
                         + (f" (other images: first {res['n_examples']})" if other else ""))
        cells.append(checks_cell(r.get("checks")))
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("checks") for r in rows):
        legend.append("- checks: eval.py --checks, the gradient-masking checks at the row's radius; a WARN names "
                      "them by number: " + ", ".join(f"{i} {n}" for i, n in enumerate(checks.NAMES, 1)))
    md = "\n".join(lines) + "\n\nAccuracy in %. Attack settings:\n" + "\n".join(legend) + "\n"
    buf = io.StringIO()
    fields = ["run", "checkpoint", "method", "network", "dataset", "epochs", "epoch", "val_clean", "val_pgd",
              "val_attack"]
    for name, _ in ATTACK_COLUMNS:
        fields += [name, f"{name}_attack", f"{name}_n"]
    fields += ["checks", "checks_n"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        out = {k: r[k] for k in fields[:10]}
        for name, _ in ATTACK_COLUMNS:
            res = r[name]
            out.update({name: res["accuracy"] if res else "", f"{name}_attack": res["attack"] if res else "",
                        f"{name}_n": res["n_examples"] if res else ""})
        c = r.get("checks")
        out.update(checks="" if c is None else checks_cell(c, images=False), checks_n=c["n_examples"] if c else "")
        w.writerow(out)
    return md, buf.getvalue()


def plot_curves(runs, path):
    """Validation PGD / clean accuracy per epoch (WA dashed, milestones dotted) and train loss + method term."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colours = plt.get_cmap("tab10").colors
    handles = []
    reached = [{m for m in ms if log and m < max(r["epoch"] for r in log)} for _, log, ms in runs]
    shared = set.intersection(*reached) if len(runs) > 1 else set()
    for i, (run, log, milestones) in enumerate(runs):
        c = colours[i % len(colours)]
        label = os.path.basename(os.path.normpath(run))
        ep = [r["epoch"] for r in log]
        for ax, key in ((axes[0], "val_pgd"), (axes[1], "val_clean")):
            for prefix, style in (("", "-"), ("wa_", "--")):
                pts = [(e, r.get(prefix + key)) for e, r in zip(ep, log) if r.get(prefix + key) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=c, marker="o" if len(pts) < 15 else None, markersize=3)
        axes[2].plot(ep, [r["train_loss"] for r in log], "-", color=c)
        for term in TERMS:
            pts = [(e, r[term]) for e, r in zip(ep, log) if r.get(term) is not None]
            if pts:
                axes[2].plot(*zip(*pts), ":", color=c, marker="x", markersize=3)
        for ax in axes:
            for m in milestones:
                if ep and m < max(ep) and m not in shared:
                    ax.axvline(m + 0.5, color=c, linestyle=":", linewidth=1, alpha=0.6)
        handles.append(Line2D([], [], color=c, label=label))
    for m in shared:  # an lr decay every run shares: one grey line, not several on top of each other
        for ax in axes:
            ax.axvline(m + 0.5, color="grey", linestyle=":", linewidth=1, alpha=0.8)
    axes[0].set_title("validation PGD accuracy (each run's --val-steps)")
    axes[1].set_title("validation clean accuracy")
    axes[2].set_title("training: loss (solid) and the method's term (dotted, x)")
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("value (log scale)")
    axes[2].set_yscale("log")
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    styles = [Line2D([], [], color="grey", linestyle="-", label="model weights"),
              Line2D([], [], color="grey", linestyle="--", marker="o", markersize=3, label="weight average"),
              Line2D([], [], color="grey", linestyle=":", label="lr decay (after that epoch)")]
    fig.legend(handles=handles + styles, loc="lower center", ncol=min(6, len(handles) + 3), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(handles) + 2) // 6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    runs = []
    for pattern in args.runs:
        for run in sorted(glob.glob(pattern)) or [pattern]:
            if os.path.abspath(run) == os.path.abspath(args.out) or os.path.isfile(run):
                continue  # the report's own folder, files beside the runs
            if os.path.isdir(run) and (glob.glob(os.path.join(glob.escape(run), "*.pt"))
                                       or os.path.exists(os.path.join(run, "log.jsonl"))):
                runs.append(run)
            else:
                print(f"skipped {run}: not a run folder (no log.jsonl or checkpoints)")
    cmdline.require(runs, "no run folders among the arguments; pass folders written by the training scripts")
    cmdline.check_writable(args.out)
    rows, curves = [], []
    for run in runs:
        log = cmdline.read_log(run)
        run_rows, milestones = rows_of(run, log)
        rows += run_rows
        if log:
            curves.append((run, log, milestones))
    md, csv_text = table(rows)
    print(md)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "report.csv"), "w") as f:
        f.write(csv_text)
    written = ["report.md", "report.csv"]
    if curves:
        plot_curves(curves, os.path.join(args.out, "curves.png"))
        written.append("curves.png")
    print("wrote " + ", ".join(os.path.join(args.out, w) for w in written))
    return rows


if __name__ == "__main__":
    cmdline.cli(main)
