#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the tiny demo finetune on an embedded local Ray,
# on a synthetic LeRobot dataset with real AV1 videos that this script writes first. Then list
# the run's checkpoints, export the last one to a LeRobot pretrained_model/, render the report,
# evaluate the best checkpoint offline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CLI=.venv/bin/smolvla-ray
OUT=demo-output
if [ ! -f "$OUT/dataset/meta/info.json" ]; then
  "$CLI" demo-dataset "$OUT/dataset" --episodes 8 --cameras top,wrist
fi
rm -rf "$OUT/runs/tiny-demo" "$OUT/pretrained_model"
"$CLI" run configs/tiny-demo.yaml "$@"
"$CLI" checkpoints "$OUT/runs/tiny-demo"
last=$(ls -d "$OUT"/runs/tiny-demo/checkpoint_[0-9]* | sort | tail -n 1)
"$CLI" export "$last" "$OUT/pretrained_model"
"$CLI" report "$OUT/runs/tiny-demo" --out "$OUT/report"
# The best checkpoint by the held-out metric, measured again offline on its held-out episodes.
"$CLI" evaluate "$OUT/runs/tiny-demo/best" --data "$OUT/dataset" --out "$OUT/eval"
echo "demo done: run in $OUT/runs/tiny-demo, LeRobot policy in $OUT/pretrained_model,"
echo "report in $OUT/report (report.png, report.md), evaluation in $OUT/eval"
