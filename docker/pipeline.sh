#!/bin/sh
# The offline pipeline inside the `pipeline` container: catalog -> features -> train -> calibrate -> export -> index,
# into the data volume. Each step runs only when its output is missing, so a second `docker compose up`
# (or one after an interrupted run) reuses what is there and redoes only the rest; training resumes.
#   N                 demo catalog size (default 6000)
#   CALIBRATION_N     products of the calibration catalog (default 1200)
#   TRAIN_CONFIG      a JSON file of training options (default: the default recipe);
#                     /app/docker/smoke-train.json is a one-minute smoke recipe
#   EXPORT_QUERIES    validation queries for the export's variant choice (default: the CLI's)
set -eu
DATA="${DATA:-/data}"
N="${N:-6000}"
CALIBRATION_N="${CALIBRATION_N:-1200}"
step() { echo "pipeline: $*"; }
done_already() { step "$1 already in $DATA, reused"; }

if [ -f "$DATA/demo/catalog.jsonl" ]; then done_already "demo catalog"; else
  step "demo catalog of $N products"
  fashionbert catalog demo --out "$DATA/demo" --n "$N" --workers 2 --overwrite
fi
if [ -f "$DATA/features/grid.h5" ]; then done_already "patch features"; else
  step "patch features"
  fashionbert features --catalog "$DATA/demo" --out "$DATA/features/grid.h5"
fi
if [ -f "$DATA/runs/default/summary.json" ]; then done_already "trained model"; else  # written when training is done
  step "training (resumes an interrupted run)"
  if [ -n "${TRAIN_CONFIG:-}" ]; then
    fashionbert train --catalog "$DATA/demo" --out "$DATA/runs/default" --features "$DATA/features/grid.h5" --config "$TRAIN_CONFIG"
  else
    fashionbert train --catalog "$DATA/demo" --out "$DATA/runs/default" --features "$DATA/features/grid.h5"
  fi
fi
if [ -f "$DATA/calibration/catalog.jsonl" ]; then done_already "calibration catalog"; else
  step "calibration catalog of $CALIBRATION_N products"
  fashionbert catalog demo --out "$DATA/calibration" --n "$CALIBRATION_N" --seed 1 --validation-share 0 --workers 2 --overwrite
fi
if [ -f "$DATA/runs/default/model/calibrated.stamp" ]; then done_already "calibration"; else
  step "calibrating the rerank weight"
  fashionbert calibrate --run "$DATA/runs/default" --catalog "$DATA/calibration"
  touch "$DATA/runs/default/model/calibrated.stamp"
fi
if [ -f "$DATA/model/manifest.json" ]; then done_already "ONNX export"; else
  step "ONNX export"
  if [ -n "${EXPORT_QUERIES:-}" ]; then
    fashionbert export --run "$DATA/runs/default" --out "$DATA/model" --overwrite --select-queries "$EXPORT_QUERIES"
  else
    fashionbert export --run "$DATA/runs/default" --out "$DATA/model" --overwrite
  fi
fi
if [ -f "$DATA/index/manifest.json" ]; then done_already "index"; else
  step "index build (reuses the training features)"
  fashionbert index build --model "$DATA/model" --catalog "$DATA/demo" --features "$DATA/features/grid.h5" --out "$DATA/index" --overwrite
fi
echo "pipeline done: model in $DATA/model, index in $DATA/index"
