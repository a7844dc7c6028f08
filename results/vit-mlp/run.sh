#!/usr/bin/env bash
# Issue 22's ViT routing-space experiment behind results/vit-mlp/: one recipe trained twice, as DS-ViT with
# one coupled width (heads and MLP together: 3 sub-networks) and with the MLP routed apart from the heads
# (mlp_ratios 2/3/4: 9 sub-networks), gates at the committed DS-ViT gates' MACs targets, one report over all
# of them (every model timed in the same interleaved run), then results/compare_gates.py compares the gates
# at equal MACs with paired intervals. Finished stages are skipped.
# Usage: results/vit-mlp/run.sh [OUT_DIR] (default runs/vit-mlp).
set -euo pipefail
out=${1:-runs/vit-mlp}
recipe=recipes/results/fashion_mnist_ds_vit_mlp.yaml
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000  # freed memory kept, as benchmarks/README.md says
done_() { [ -f "$out/$1/final.pt" ]; }
# stage II as the DS-ViT quickstart recipe runs it: AdamW, one epoch, the complexity term toward the target
gate_set=(--set optim.opt=adamw --set optim.lr=0.002 --set optim.weight_decay=0.01 --set optim.epochs=1
          --set optim.warmup_epochs=0 --set optim.min_lr=1.0e-4 --set gate.complexity=target
          --set gate.complexity_weight=1.0)
done_ coupled || dsctl train-supernet "$recipe" --set model.kwargs.mlp_ratios=null --out "$out/coupled" -q
done_ mlp || dsctl train-supernet "$recipe" --out "$out/mlp" -q
runs=("$out/coupled" "$out/mlp")
for t in 5.02 6.70; do   # 45% and 60% of the full DS-ViT's 11.16 M MACs, as results/fashion-mnist-vit's gates
  # coupled: the two widths that bracket the target (the committed setting); MLP apart: the two sub-networks
  # that bracket it, and a window of four
  done_ "coupled-gate-$t" || dsctl train-gate "$recipe" --supernet "$out/coupled" --target-macs "$t" \
    "${gate_set[@]}" --set model.kwargs.mlp_ratios=null --out "$out/coupled-gate-$t" -q
  done_ "mlp-gate-$t-w2" || dsctl train-gate "$recipe" --supernet "$out/mlp" --target-macs "$t" \
    "${gate_set[@]}" --out "$out/mlp-gate-$t-w2" -q
  done_ "mlp-gate-$t-w4" || dsctl train-gate "$recipe" --supernet "$out/mlp" --target-macs "$t" \
    "${gate_set[@]}" --set gate.window_size=4 --out "$out/mlp-gate-$t-w4" -q
  runs+=("$out/coupled-gate-$t" "$out/mlp-gate-$t-w2" "$out/mlp-gate-$t-w4")
done
dsctl report "${runs[@]}" --out results/vit-mlp --latency-batch 32 --threads 2 --min-run-time 1 \
  --device cpu --title "DS-ViT: heads and MLP coupled vs routed apart, Fashion-MNIST"
python results/compare_gates.py results/vit-mlp coupled mlp
