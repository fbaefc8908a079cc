#!/usr/bin/env bash
# The README's ten-minute CPU demo, run as printed there and timed: the numbers the README states come from this
# script (a test keeps its commands and the README's the same). From the repository's root:
#     bash docs/cpu_demo.sh
# It starts afresh: it removes the demo's own folders, runs/demo-natural and runs/demo-at, first.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf runs/demo-natural runs/demo-at
t() { local t0=$SECONDS; "$@"; echo "[$(( SECONDS - t0 )) s] $*" >&2; }
# ---- the README's demo ----
D="--dataset fashion_mnist --arch cnn --epochs 2 --milestones 1 --max-batches 100 --resume"
t python at.py $D --eps 0 --out runs/demo-natural
t python at.py $D --eps 0.1 --alpha 0.025 --out runs/demo-at
t python eval.py runs/demo-natural runs/demo-at --eps 0.1 --n-examples 1000 --attacks clean fgsm pgd cw --curve
t python eval.py runs/demo-at --eps 0.1 --attacks --checks
# ---- end ----
python - <<'PY'
import json
for run in ("demo-natural", "demo-at"):
    r = json.load(open(f"runs/{run}/best.eval.json"))["results"].values()
    print(run, ", ".join(f"{v['name']} {v['accuracy']:.1f} %" for v in r if v["n_examples"] == 1000))
PY
