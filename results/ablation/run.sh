#!/usr/bin/env bash
# Issue 22's stage-II ablation behind results/ablation/: on the committed Fashion-MNIST supernet
# (results/fashion-mnist-latency), one gate per routing decision, each changed alone from dsctl's default
# gate at 45% of the full network's MACs, with the pipeline's gate optimiser. Finished runs are skipped.
# Usage: results/ablation/run.sh SUPERNET_RUN [OUT_DIR]   (SUPERNET_RUN: runs/results-fm-latency/supernet)
set -euo pipefail
sup=$1; out=${2:-runs/ablation}
recipe=recipes/results/fashion_mnist_ds_resnet_latency.yaml
target=10.5864   # 45% of the full network's 23.5252 M MACs, as the committed gate
common=(--supernet "$sup" --target-macs "$target" -q --set optim.opt=adamw --set optim.lr=0.002
        --set optim.weight_decay=0.01 --set optim.epochs=3 --set optim.warmup_epochs=0 --set optim.min_lr=1.0e-4
        --set gate.complexity_weight=1.0)
gate() {  # name, overrides...
  local name=$1; shift
  [ -f "$out/$name/final.pt" ] && return 0
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  dsctl train-gate "$recipe" "${common[@]}" --out "$out/$name" "${sets[@]}"
}
gate default
gate authors-sgs gate.sgs_target=authors
gate argmax gate.decision=argmax
gate window-4 gate.window_size=4
gate no-class-weighting gate.class_weighting=false
dsctl report "$sup" "$out"/default "$out"/authors-sgs "$out"/argmax "$out"/window-4 "$out"/no-class-weighting \
  --out "$out/report" --latency-batch 32 --min-run-time 0.2 --threads 2 --device cpu
python results/ablation/collect.py "$out" results/ablation
