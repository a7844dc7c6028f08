#!/usr/bin/env bash
# `make gpu-check`: what only a CUDA machine can check, in one short run (about 10 minutes on an H100).
#  1. the test suite's CUDA cases (tests marked gpu);
#  2. a short supernet and gate run on CUDA with mixed precision (the smoke recipe, generated data);
#  3. the latency headroom of the ImageNet-size families on the GPU (dsctl analyze's timing, batch 1 and 64);
#  4. the benchmark runner in its CUDA mode (P1-P3: slicing overhead, realised speed-up, routed model).
# Writes results/benchmarks/gpu-<card>-*.csv and runs/gpu-check/; never needed by tests or CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA device visible to torch; nothing to do" >&2
    exit 1
fi
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
OUT=results/benchmarks
RUNS=runs/gpu-check
mkdir -p "$OUT" "$RUNS"
echo "gpu-check on $CARD"
"$PY" -m pytest -q -m gpu -p no:cacheprovider
"$PY" -m dsctl train-supernet recipes/smoke/synthetic_tiny_ds_resnet.yaml --out "$RUNS/sup" --device cuda --quiet \
    --set optim.amp=true --set optim.epochs=2
"$PY" -m dsctl train-gate recipes/smoke/synthetic_tiny_ds_resnet.yaml --supernet "$RUNS/sup" --window 0:3 \
    --target-macs 1.0 --out "$RUNS/gate" --device cuda --quiet --set optim.amp=true --set optim.epochs=1
"$PY" - "$OUT/gpu-$CARD-headroom.csv" <<'PYEOF'
import sys
import dsctl
from dsctl.headroom import measure_latency_table, span_verdict
from dsctl.report import write_csv
rows = []
for name, size in (("ds_resnet50", 224), ("ds_mobilenetv1", 224), ("ds_deit_small", 224)):
    model = dsctl.build_model(name).cuda().eval()
    table = measure_latency_table(model, size, batches=(1, 64), device="cuda", min_run_time_s=0.5)
    for b in table.batches:
        print(span_verdict(table, b))
    rows += [{"model": name, **r} for r in table.rows()]
write_csv(sys.argv[1], rows)
PYEOF
"$PY" -m benchmarks --device cuda --threads 1 --only p1,p2,p3 --out "$OUT/gpu-$CARD.csv"
echo "gpu-check: wrote $OUT/gpu-$CARD.csv, $OUT/gpu-$CARD-headroom.csv and $RUNS/"
