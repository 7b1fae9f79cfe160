#!/usr/bin/env bash
# The device checks that need a GPU, as one script (run from the repository root):
#   1. the CTR benchmark (torch-rechub 0.9.0 vs ours) on the GPU,
#   2. one run of the DDP config on 1 GPU with bf16, throughput recorded.
# Wheels of pure-Python packages the GPU image lacks travel in .whl/ (see benchmarks/RESULTS.md).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
else
  export PYTHONPATH=$PWD/src:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, torchmetrics; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__)" | tee -a "$OUT/gpu.txt"
timeout 420 python3 -m benchmarks.ctr --device cuda:0 --rows ${ROWS:-500000} --vocabs 100000 1000000 \
  --variants reference trainer trainer_dense module bare --json "$OUT/gpu_ctr.json" 2>&1 | grep -v Warning | tee "$OUT/gpu_ctr.txt"
start=$(date +%s.%N)
timeout 150 python3 -m rechub_lightning.cli fit --config configs/ctr/deepfm.yaml --config configs/trainer/ddp.yaml \
  --trainer.devices=1 --trainer.max_epochs=2 --trainer.enable_progress_bar=false --trainer.default_root_dir=/tmp/ddp_run \
  --data.init_args.synthetic_rows=500000 2>&1 | grep -v Warning | tail -15 | tee "$OUT/ddp_bf16.txt"
end=$(date +%s.%N)
python3 - "$start" "$end" <<'PY' | tee -a "$OUT/ddp_bf16.txt"
import sys, glob, pandas as pd
s, e = map(float, sys.argv[1:3])
m = pd.read_csv(sorted(glob.glob('/tmp/ddp_run/**/metrics.csv', recursive=True))[-1])
ep = m.groupby('epoch').last(numeric_only=True)
print(f"wall {e - s:.1f} s for the whole command (data generation, 2 epochs, validation); "
      f"training rows/s per epoch: {ep['train/rows_per_sec'].dropna().round(0).tolist()}; "
      f"val/auc by epoch: {ep['val/auc'].dropna().round(4).tolist()}")
PY
