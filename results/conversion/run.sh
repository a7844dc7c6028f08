#!/usr/bin/env bash
# Issue 23's conversion experiment behind results/conversion/: a static network trained by dsctl stands in
# for a pretrained one (no weights can be downloaded here); it is converted by every criterion, the best
# conversion is fine-tuned with the sandwich rule on a third of the training images, and the supernet
# trained from scratch is run with that budget and with three times it. Finished stages are skipped.
# Usage: results/conversion/run.sh [OUT_DIR] (default runs/conversion); then collect.py writes the tables.
set -euo pipefail
out=${1:-runs/conversion}
recipe=recipes/results/fashion_mnist_ds_resnet_latency.yaml    # model, data and 6-epoch schedule
finetune=recipes/results/fashion_mnist_ds_resnet_finetune.yaml  # the same model and data, 2 epochs
done_() { [ -f "$out/$1/final.pt" ]; }
# 1. the stand-in: the full network trained alone, as any static network is (6 epochs)
done_ pretrained || dsctl baseline "$recipe" --method uniform --width largest --out "$out/pretrained" -q
# 2. conversion by every criterion (each also evaluates the weights as they came: the first-k baseline)
for c in l1 l2 bn_scale taylor; do
  done_ "convert-$c" || dsctl convert "$recipe" --init-from "$out/pretrained" --criterion "$c" --out "$out/convert-$c" -q
done
best=$(python results/conversion/collect.py "$out" --best-criterion)
# 3. sandwich fine-tune from the best conversion (and from the unordered weights, the control)
done_ finetune || dsctl train-supernet "$finetune" --init-from "$out/convert-$best" --out "$out/finetune" -q
done_ convert-none || dsctl convert "$recipe" --init-from "$out/pretrained" --criterion none --out "$out/convert-none" -q
done_ finetune-unordered || dsctl train-supernet "$finetune" --init-from "$out/convert-none" --out "$out/finetune-unordered" -q
# 4. from scratch: the fine-tune's budget (2 epochs, the 6-epoch recipe cut) and three times it (6 epochs)
done_ scratch-2ep || dsctl train-supernet "$recipe" --set optim.epochs=2 --out "$out/scratch-2ep" -q
done_ scratch-6ep || dsctl train-supernet "$recipe" --out "$out/scratch-6ep" -q
# 5. per-image correctness of every sub-network (the paired intervals of collect.py)
for r in "convert-$best" convert-none finetune finetune-unordered scratch-2ep scratch-6ep; do
  [ -f "$out/$r/analysis/correctness.pt" ] || dsctl analyze "$out/$r" --no-latency -q >/dev/null
done
python results/conversion/collect.py "$out" results/conversion
