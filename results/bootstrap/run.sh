#!/usr/bin/env bash
# Bootstrapping comparison behind results/bootstrap/: every stage-I target mode on two real data sets,
# plus the same widths trained alone. Usage: [SEED=N] results/bootstrap/run.sh DATASET OUT_DIR
#   DATASET: digits (needs DIGITS_DIR, made by make_digits_idx.py) or fashion_mnist
#   SEED: overrides the recipes' seed (1) for every run
set -euo pipefail
ds=$1; out=$2
seed=(); [ -n "${SEED:-}" ] && seed=(--seed "$SEED")
case $ds in
  digits) recipe=recipes/bootstrap/digits_ds_resnet.yaml; data=(--data "mnist:${DIGITS_DIR:?set DIGITS_DIR}") ;;
  fashion_mnist) recipe=recipes/bootstrap/fashion_mnist_ds_resnet.yaml; data=() ;;
  *) echo "unknown data set $ds (allowed: digits, fashion_mnist)" >&2; exit 2 ;;
esac
run() {  # name, overrides...
  local name=$1; shift
  [ -f "$out/$name/final.pt" ] && return 0
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  if [ -f "$out/$name/last.pt" ]; then dsctl train-supernet --resume "$out/$name" -q
  else dsctl train-supernet "$recipe" "${data[@]}" "${seed[@]}" --out "$out/$name" "${sets[@]}" -q; fi
}
run none supernet.target=none
run id supernet.target=id supernet.distill_weight=1.0 supernet.distill_ramp=0.0
run ib supernet.target=ib supernet.distill_weight=1.0 supernet.distill_ramp=0.0
run eib supernet.target=eib supernet.distill_weight=1.0 supernet.distill_ramp=0.0
run ib-mix supernet.target=ib supernet.distill_weight=0.5 supernet.distill_ramp=0.5
for w in 0.25 0.5 1.0; do
  [ -f "$out/uniform-w$w/final.pt" ] || dsctl baseline "$recipe" "${data[@]}" "${seed[@]}" --method uniform --width $w --out "$out/uniform-w$w" -q
done
