#!/usr/bin/env bash
# Does a click segmenter (sts-clcs's network with the click as a third input channel, DeepGrow-style;
# LesionSegLib.engine.learn.train_click) answer clicks better than sts-clcs's plain dense click?
# Chosen on training cases left out of its training (STS_028-033), never on the validation split.
# About 40 min on the 2-core CPU (the training budget is 38 min).  Run from the repository root.
set -euo pipefail
export PYTHONPATH=LesionSeg
PY=${PYTHON:-.venv/bin/python}
HOLD=STS_028,STS_029,STS_030,STS_031,STS_032,STS_033
OUT=Resources/evaluation/click_segmenter
MODEL=runs/clcs_click_holdout
if [ ! -f runs/click_holdout/click_segmenter.json ]; then
  OMP_NUM_THREADS=1 $PY -m LesionSegLib.engine.learn.train_click --base sts-clcs -o runs/click_holdout --minutes 38 --threads 1 --holdout $HOLD
fi
rm -rf $MODEL && mkdir -p $MODEL
cp LesionSeg/LesionSegLib/models/sts-clcs/card.json LesionSeg/LesionSegLib/models/sts-clcs/*.safetensors $MODEL/
$PY -m LesionSegLib.engine.learn.train_click --attach runs/click_holdout --to $MODEL --version 9.0.0
mkdir -p $OUT
cp runs/click_holdout/click_segmenter.json $OUT/holdout_training.json
$PY Testing/benchmarks/bench_click.py --model sts-clcs --cases $HOLD -o $OUT/holdout_base.json
$PY Testing/benchmarks/bench_click.py --model $MODEL --cases $HOLD -o $OUT/holdout_click_segmenter.json
