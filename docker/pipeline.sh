#!/bin/sh
# The offline pipeline inside the `pipeline` container: catalog -> features -> train -> calibrate -> export -> index,
# into the data volume. Each step skips what is already built, as `make demo` does on the host.
set -eu
DATA="${DATA:-/data}"
N="${N:-6000}"
[ -f "$DATA/demo/catalog.jsonl" ] || fashionbert catalog demo --out "$DATA/demo" --n "$N" --workers 2 --overwrite
[ -f "$DATA/features/grid.h5" ] || fashionbert features --catalog "$DATA/demo" --out "$DATA/features/grid.h5"
[ -f "$DATA/runs/default/model/config.json" ] || fashionbert train --catalog "$DATA/demo" --out "$DATA/runs/default"
[ -f "$DATA/calibration/catalog.jsonl" ] || fashionbert catalog demo --out "$DATA/calibration" --n 1200 --seed 1 --validation-share 0 --workers 2 --overwrite
if [ ! -f "$DATA/runs/default/model/calibrated.stamp" ]; then
  fashionbert calibrate --run "$DATA/runs/default" --catalog "$DATA/calibration"
  touch "$DATA/runs/default/model/calibrated.stamp"
fi
[ -f "$DATA/model/manifest.json" ] || fashionbert export --run "$DATA/runs/default" --out "$DATA/model" --overwrite
[ -f "$DATA/index/manifest.json" ] || fashionbert index build --model "$DATA/model" --catalog "$DATA/demo" --out "$DATA/index" --overwrite
echo "pipeline done: model in $DATA/model, index in $DATA/index"
