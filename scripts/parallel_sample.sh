#!/usr/bin/env bash
# Shard generate_samples.py over K processes (one per GPU when GPUs are present), then join.
#
#   bash scripts/parallel_sample.sh K OUT.jsonl CHECKPOINT --prompts toy --split test --n-samples 2 ...
#
# The prompt list (fixed order) is cut into K disjoint, exact ranges [i*N/K, (i+1)*N/K); shard i
# runs with CUDA_VISIBLE_DEVICES=i when nvidia-smi lists at least K GPUs, else on the CPU. The
# shards are concatenated in range order and the result is checked to hold every prompt index
# exactly once; a failed shard fails the whole run (its log is under OUT.shards/).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 K OUT.jsonl CHECKPOINT [generate_samples.py options...]" >&2; exit 2
fi
K=$1; OUT=$2; CKPT=$3; shift 3
HERE="$(cd "$(dirname "$0")" && pwd)"
PY=${PYTHON:-python}
N=$("$PY" "$HERE/generate_samples.py" --count-prompts "$@" | tail -1)
if [ "$K" -lt 1 ] || [ "$K" -gt "$N" ]; then echo "K=$K must be in 1..$N (prompts)" >&2; exit 2; fi
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
SHARDS="$OUT.shards"; mkdir -p "$SHARDS"
pids=()
for ((i = 0; i < K; i++)); do
  START=$((i * N / K)); END=$(((i + 1) * N / K))
  if [ "$GPUS" -ge "$K" ]; then DEV=(env CUDA_VISIBLE_DEVICES=$i); else DEV=(env OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}); fi
  "${DEV[@]}" "$PY" "$HERE/generate_samples.py" "$CKPT" "$@" --start "$START" --end "$END" \
      --out "$SHARDS/shard-$i.jsonl" > "$SHARDS/shard-$i.log" 2>&1 &
  pids+=($!)
done
failed=0
for ((i = 0; i < K; i++)); do
  if ! wait "${pids[$i]}"; then echo "shard $i failed: see $SHARDS/shard-$i.log" >&2; failed=1; fi
done
[ "$failed" -eq 0 ] || exit 1
TMP="$OUT.tmp-$$"
for ((i = 0; i < K; i++)); do cat "$SHARDS/shard-$i.jsonl"; done > "$TMP"
"$PY" - "$TMP" "$N" <<'PYEOF'
import json, sys
idx = [json.loads(line)["index"] for line in open(sys.argv[1]) if line.strip()]
n = int(sys.argv[2])
if idx != list(range(n)):
    sys.exit(f"joined shards hold indices {idx[:5]}... ({len(idx)} rows), expected 0..{n - 1} once each")
PYEOF
mv "$TMP" "$OUT"
echo "wrote $N prompts from $K shards to $OUT"
