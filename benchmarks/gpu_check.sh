#!/usr/bin/env bash
# One prepared GPU check: a 1-worker Ray Train run of variant `paper` at 256x256 on an OL stand-in at 2048x1536.
# Prints train pairs/s, GPU memory and the fraction of step time spent waiting for data, per epoch.
# Target on one H200: >= 1000 train pairs/s, data wait < 5%.
#
#   bash benchmarks/gpu_check.sh                      # on a machine with a GPU (installs into .venv if needed)
#   GPUS=0 PAIRS=16 EPOCHS=1 BATCH=4 bash benchmarks/gpu_check.sh   # a CPU dry run of the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-1} PAIRS=${PAIRS:-600} EPOCHS=${EPOCHS:-4} BATCH=${BATCH:-64} LOADERS=${LOADERS:-8}
PY=${PY:-python3}
if ! $PY -c "import anodfd" 2>/dev/null; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q -e . && PY=.venv/bin/python
fi
WORK=${WORK:-$(mktemp -d)}
export ANODFD_CACHE_DIR=$WORK/cache PYTHONUNBUFFERED=1
$PY -m anodfd synth OL --out "$WORK/OL" --pairs "$PAIRS" --size 2048x1536 --seed 0 >/dev/null
$PY - "$WORK" "$GPUS" "$EPOCHS" "$BATCH" "$LOADERS" <<'PYEOF'
import sys, torch
from anodfd.config import Config
from anodfd.tracking import client
from anodfd.train.launch import RayOptions, train_on_ray

work, gpus, epochs, batch, loaders = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
config = Config().with_flat({"data.data": f"{work}/OL", "model.name": "paper", "model.depth": 2,
                             "train.epochs": epochs, "train.batch_size": batch, "data.num_workers": loaders,
                             "train.device": "cuda" if gpus else "cpu"})
opts = RayOptions(workers=1, gpus_per_worker=gpus, cpus_per_worker=None if not gpus else 4,
                  storage=f"{work}/runs", name="gpu-check", mlflow_uri=f"sqlite:///{work}/mlflow.db")
out = train_on_ray(config, opts)
hist = lambda k: [m.value for m in sorted(client(out.mlflow_uri).get_metric_history(out.mlflow_run_id, k), key=lambda m: m.step)]
name = torch.cuda.get_device_name(0) if gpus and torch.cuda.is_available() else "CPU"
print(f"\n{name}: variant paper, depth 2, 256x256, batch {batch}, {loaders} loader processes, {epochs} epochs")
print("| epoch | train pairs/s | data wait | GPU memory (GB) |\n|---|---|---|---|")
mem = hist("gpu_memory_gb") or [float("nan")] * epochs
for e, (r, w, m) in enumerate(zip(hist("pairs_per_s"), hist("data_wait"), mem), 1):
    print(f"| {e} | {r:.0f} | {100 * w:.1f}% | {m:.1f} |")
PYEOF
