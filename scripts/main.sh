#!/usr/bin/env bash
# The main job: set up .venv, train the tiny Spark preset on the bundled corpus (resuming if
# runs/tiny already holds checkpoints), then generate text from its final checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
.venv/bin/python train.py --config tiny --workdir runs/tiny "$@"
for prompt in "In the beginning" "And the LORD said unto Moses," "Blessed are they"; do
  .venv/bin/python serve.py --checkpoint runs/tiny --prompt "$prompt" --max-tokens 40 \
    --temperature 0.7 --top-p 0.9 --seed 0
done
