#!/usr/bin/env bash
# The GPU check, in one go (at most ~8 minutes): the `gpu` tests, the configs/360.gin training step (full MLPs,
# 16,384 rays) in fp32 / tf32 / bf16 / bf16 + torch.compile, without and with gradient accumulation, and one
# 1-megapixel render (chunk sized from the free memory). Prints one table and writes it to $OUT/gpu_check.txt
# (the benchmarks' JSON lines next to it, in gpu_check.jsonl, and each step's output in gpu_check.log).
#
#   bash bench/gpu_check.sh           # on a CUDA machine, from anywhere
#   CPU=1 bash bench/gpu_check.sh     # dry run on the CPU: every step, with tiny sizes
#
# Python packages the machine lacks (e.g. gin-config, imageio-ffmpeg) are installed with --no-deps from the
# wheels carried in .whl/ (ignored by git; see the `pip download` command in bench/RESULTS.md) into
# .whl/site, which is put on PYTHONPATH: nothing of the machine's Python (torch above all) is reinstalled.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.jsonl"
TABLE="$OUT/gpu_check.txt"
: >"$LOG"
: >"$JSON"
# Seconds for the whole check (each step's timeout, its 10 s kill grace included, ends within it); a step that
# would start with too little left is skipped.
BUDGET=${BUDGET:-470}
STATUS=()

# Missing packages, from the carried wheels (module name : wheel name prefix).
SITE="$PWD/.whl/site"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
for pair in gin:gin_config imageio_ffmpeg:imageio_ffmpeg tqdm:tqdm PIL:pillow pytest:pytest pluggy:pluggy \
            iniconfig:iniconfig packaging:packaging pygments:pygments hypothesis:hypothesis \
            sortedcontainers:sortedcontainers; do
  mod=${pair%%:*}
  whl=${pair#*:}
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    files=(.whl/"$whl"-*.whl)
    if [ -e "${files[0]}" ]; then
      "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${files[@]}" >>"$LOG" 2>&1 \
        && echo "installed ${files[*]##*/} into .whl/site" || echo "could not install ${files[*]}"
    else
      echo "warning: python module $mod is missing and .whl/ has no $whl wheel"
    fi
  fi
done
timeout 60 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1 | tee -a "$LOG"

if [ -n "${CPU:-}" ]; then
  DEVICE=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  # The 360 config with tiny MLPs and sample counts, so each step runs in seconds.
  SMALL=(--gin_bindings "NerfMLP.net_width = 32" "NerfMLP.net_depth = 2" "PropMLP.net_width = 16"
         "PropMLP.net_depth = 1" "Model.num_prop_samples = 8" "Model.num_nerf_samples = 8")
  TRAIN=(--batch_size 64 --steps 1 --warmup 1 --grad_accum_steps)
  ACCUM=2
  RENDER=(--width 32 --height 32 --repeats 1 --warmup 0)
  LIMIT_SCALE=${LIMIT_SCALE:-6}  # bf16 matrix products and compilation are slow on a (shared) CPU.
  BUDGET=${BUDGET_CPU:-2400}
else
  DEVICE=cuda
  SMALL=()
  TRAIN=(--steps 8 --warmup 3 --grad_accum_steps)
  ACCUM=4
  RENDER=(--width 1024 --height 1024 --repeats 1 --warmup 1)
  LIMIT_SCALE=1
fi

# step NAME LIMIT_SECONDS COMMAND...: runs it with a timeout (cut to what is left of the budget), logs it.
step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local left=$((BUDGET - SECONDS - 10))
  if [ "$left" -lt 20 ]; then
    STATUS+=("$name: skipped (budget spent)")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local what="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMEOUT"
  [ $rc -ne 0 ] && [ "$what" = ok ] && what="FAILED (exit $rc)"
  STATUS+=("$name: $what in $((SECONDS - t0)) s")
  tail -n 1 "$LOG"
}

# tests/test_gpu.py last: its short trainings (one of them on the CPU, ~2 min on 2 cores) are the slowest, so
# a timeout there still leaves the other files' results; -v logs the name of each test as it finishes.
TESTS=()
for f in tests/test_*.py; do
  [ "$f" = tests/test_gpu.py ] || TESTS+=("$f")
done
step "pytest -m gpu" 150 "$PY" -m pytest -v -m gpu -p no:cacheprovider --continue-on-collection-errors \
  "${TESTS[@]}" tests/test_gpu.py
bench_train() {  # label, then extra flags
  local label=$1
  shift
  step "train $label" "$TRAIN_LIMIT" "$PY" bench/bench_train.py --gin_configs configs/360.gin "${SMALL[@]}" \
    --device "$DEVICE" --label "$label" --json "$JSON" "$@"
}
TRAIN_LIMIT=45
for p in fp32 tf32 bf16; do
  bench_train "$p" --precision "$p" "${TRAIN[@]}" 1
  bench_train "$p accum $ACCUM" --precision "$p" "${TRAIN[@]}" "$ACCUM"
done
bench_train "bf16 accum auto" --precision bf16 "${TRAIN[@]}" auto
TRAIN_LIMIT=120
bench_train "bf16 compile" --precision bf16 --compile model "${TRAIN[@]}" 1
bench_train "bf16 compile accum $ACCUM" --precision bf16 --compile model "${TRAIN[@]}" "$ACCUM"
step "render 1 MP" 90 "$PY" bench/bench_render.py --gin_configs configs/360.gin "${SMALL[@]}" --device "$DEVICE" \
  --chunk auto "${RENDER[@]}" --label "default precision" --json "$JSON"

"$PY" - "$JSON" "$TABLE" "${STATUS[@]}" <<'EOF'
import json, sys
out = ['| bench | mode | flags | batch / size | ms | rays/s | peak MiB |', '|---|---|---|---|---|---|---|']
for line in open(sys.argv[1]):
    try:  # A step killed by its timeout may have left half a line.
        r = json.loads(line)
    except ValueError:
        continue
    out.append(f"| {r['bench']} {r['config']} | {r['label']} | {r['flags']} | {r.get('batch', r.get('size'))} | "
               f"{r['ms']:.1f} | {r['rays_per_s']:.0f} | {r['peak_mib']:.0f} |")
out += ['', 'steps:'] + [f'- {s}' for s in sys.argv[3:]]
text = '\n'.join(out)
print(text)
open(sys.argv[2], 'w').write(text + '\n')
EOF
echo "table: $TABLE; step outputs: $LOG"
