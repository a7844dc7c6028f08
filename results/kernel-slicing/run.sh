#!/usr/bin/env bash
# Issue 22's kernel-size slicing experiment behind results/kernel-slicing/: one recipe trained twice, as
# DS-MobileNetV1 routing over width alone (tiny_ds_mobilenetv1, 6 sub-networks) and over width and kernel
# size (tiny_ds_mobilenetv1pp, 18 sub-networks), gates at the same MACs targets, one report over all of
# them (every model timed in the same interleaved run), then results/compare_gates.py compares the gates at equal MACs
# with paired intervals. Finished stages are skipped.
# Usage: results/kernel-slicing/run.sh [OUT_DIR] (default runs/kernel-slicing).
set -euo pipefail
out=${1:-runs/kernel-slicing}
recipe=recipes/results/fashion_mnist_ds_mobilenetv1_kernels.yaml
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000  # freed memory kept, as benchmarks/README.md says
done_() { [ -f "$out/$1/final.pt" ]; }
# stage II as the quickstart runs it: AdamW 3 epochs, the complexity term pulling toward the target
gate_set=(--set optim.opt=adamw --set optim.lr=0.002 --set optim.weight_decay=0.01 --set optim.epochs=3
          --set optim.warmup_epochs=0 --set optim.min_lr=1.0e-4 --set gate.complexity=target
          --set gate.complexity_weight=1.0)
done_ width || dsctl train-supernet "$recipe" --set model.name=tiny_ds_mobilenetv1 --out "$out/width" -q
done_ kernel || dsctl train-supernet "$recipe" --out "$out/kernel" -q
runs=("$out/width" "$out/kernel")
for t in 1.2 1.6; do   # MACs targets in millions, inside both spaces' ranges (0.76-2.09 and 0.76-2.43 M)
  # width alone: the three widths around the target; width and kernel: the same three widths at every kernel
  # size (window of 9), and the default window of three (which then spans one width at three kernel sizes)
  done_ "width-gate-$t" || dsctl train-gate "$recipe" --supernet "$out/width" --target-macs "$t" \
    "${gate_set[@]}" --set model.name=tiny_ds_mobilenetv1 --out "$out/width-gate-$t" -q
  done_ "kernel-gate-$t-w9" || dsctl train-gate "$recipe" --supernet "$out/kernel" --target-macs "$t" \
    "${gate_set[@]}" --set gate.window_size=9 --out "$out/kernel-gate-$t-w9" -q
  done_ "kernel-gate-$t-w3" || dsctl train-gate "$recipe" --supernet "$out/kernel" --target-macs "$t" \
    "${gate_set[@]}" --out "$out/kernel-gate-$t-w3" -q
  runs+=("$out/width-gate-$t" "$out/kernel-gate-$t-w9" "$out/kernel-gate-$t-w3")
done
dsctl report "${runs[@]}" --out results/kernel-slicing --latency-batch 32 --threads 2 --min-run-time 1 \
  --device cpu --title "DS-MobileNetV1: width alone vs width and kernel size, Fashion-MNIST"
python results/compare_gates.py results/kernel-slicing width kernel
