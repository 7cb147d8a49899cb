#!/usr/bin/env bash
# Evaluate a model on the STS validation split (STS_034-041) and the three chest scans with the
# committed `lesionseg segment` + `lesionseg evaluate` commands; reports under Resources/evaluation/<tag>/.
#   Testing/benchmarks/eval_detseg.sh [MODEL] [TAG]     (defaults: sts-detseg detseg)
set -euo pipefail
MODEL=${1:-sts-detseg}
TAG=${2:-detseg}
DATA=${LESIONSEG_DATA:-../shared/data}
PY=${PYTHON:-python}
WORK=${WORK:-runs/eval-$TAG}
OUT=Resources/evaluation/$TAG
mkdir -p "$WORK" "$OUT"
val=()
for i in 34 35 36 37 38 39 40 41; do val+=("$DATA/sts/STS_0$i/image.nii.gz"); done
$PY -m LesionSegLib.engine.cli segment "${val[@]}" -o "$WORK/sts_val" --model "$MODEL" --device cpu --progress none --threads 2
$PY -m LesionSegLib.engine.cli evaluate --pred "$WORK/sts_val" --gt "$DATA/sts" --split val -o "$OUT/sts_val"
$PY -m LesionSegLib.engine.cli segment "$DATA/fullscan/lung1/image.nii.gz" "$DATA/fullscan/lung2/image.nii.gz" -o "$WORK/fullscan" --model "$MODEL" --device cpu --progress none --threads 2
$PY -m LesionSegLib.engine.cli evaluate --pred "$WORK/fullscan" --gt "$DATA/fullscan" -o "$OUT/fullscan"
$PY -m LesionSegLib.engine.cli segment "$DATA/lidc/LIDC-IDRI-0001/image.nii.gz" -o "$WORK/lidc" --model "$MODEL" --device cpu --progress none --threads 2
$PY -m LesionSegLib.engine.cli evaluate --pred "$WORK/lidc" --gt "$DATA/lidc" -o "$OUT/lidc"
