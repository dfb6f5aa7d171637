#!/usr/bin/env bash
# The GPU acceptance run (issue 15): tests, model throughput, training and parity, store decode on one GPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # OUT_DIR/gpu_check.log + OUT_DIR/gpu_check.json
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh OUT_DIR   # print the commands, run nothing
#
# Every step has its own timeout and a failing step does not stop the others. The steps share one budget
# (GPU_CHECK_BUDGET seconds, default 480 = 8 min, the venv install not counted): a step never gets more than
# what is left, and a step with under 10 s left is skipped (rc 125). Run from the repository root or anywhere.
# Order (most GPU-specific first, so a short budget cuts the least): CUDA tests, CPU/GPU fp32 parity on the
# reference fixture, model throughput (bf16, then --compile), 200-step training in bf16 and fp16 (stop at 100,
# resume), the clip store's nvjpeg decode rate, the `#| cuda` notebook cells, the `make test-fast` tier.
set -uo pipefail

OUT=${1:?usage: gpu_check.sh OUT_DIR}
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-480}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
RES=$OUT/steps.tsv            # step \t rc \t seconds \t key numbers (JSON object)
: > "$LOG"; : > "$RES"
PY=$ROOT/.venv/bin/python
export EVL_NB_SHARED=${EVL_NB_SHARED:-$ROOT/../shared}
export PYTHONUNBUFFERED=1

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# ---- venv (not counted in the budget: a fresh machine has to build it once) ----------------------------
if [ ! -x "$PY" ] || [ ! -e "$ROOT/.venv/.evl-nb-installed" ]; then
  if [ "$DRY" = 1 ]; then log "DRY: timeout 420 make install"
  else log "no .venv: make install"; timeout 420 make install >>"$LOG" 2>&1; log "make install rc=$?"; fi
fi

START=$SECONDS
# run NAME TIMEOUT CMD... : one step, its output in the log, its rc and seconds in steps.tsv
run() {
  local name=$1 lim=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  [ "$lim" -gt "$left" ] && lim=$left
  if [ "$DRY" = 1 ]; then log "DRY [$name] timeout $lim $(printf '%q ' "$@")"; printf '%s\t0\t0\t{}\n' "$name" >> "$RES"; return 0; fi
  if [ "$lim" -lt 10 ]; then log "[$name] SKIPPED: budget spent"; printf '%s\t125\t0\t{}\n' "$name" >> "$RES"; return 125; fi
  log "[$name] (timeout ${lim}s) $(printf '%q ' "$@")"
  local t0=$SECONDS
  timeout -k 10 "$lim" "$@" > "$OUT/$name.out" 2>&1; local rc=$?
  cat "$OUT/$name.out" >> "$LOG"
  log "[$name] rc=$rc in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t{}\n' "$name" "$rc" "$((SECONDS - t0))" >> "$RES"
  return $rc
}

log "gpu_check in $ROOT -> $OUT, budget ${BUDGET}s, git $(git rev-parse --short HEAD 2>/dev/null)"
[ "$DRY" = 1 ] || { nvidia-smi >>"$LOG" 2>&1;
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$LOG"; }

# ---- 1. the CUDA tests ---------------------------------------------------------------------------------------------
# the `cuda` tier of pytest.ini (elsewhere these tests skip)
run pytest_cuda 45 "$PY" -m pytest -q -rs -m cuda
# ---- 2. same logits on CPU and GPU in fp32 on the reference fixture ---------------------------------------
run parity_fp32 40 "$PY" - <<'EOF'
import json, torch
from evl_nb.core import shared_dir
from evl_nb.model import reference_model
torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
ref = torch.load(shared_dir() / 'fixtures' / 'evl_reference_tiny.pt', weights_only=True)
m = reference_model(ref).float().eval()
with torch.no_grad():
    cpu = m(ref['input'].float())
    gpu = m.cuda()(ref['input'].float().cuda()).cpu()
d_cg, d_ref = (cpu - gpu).abs().max().item(), (gpu - ref['logits']).abs().max().item()
print('KEYS', json.dumps(dict(max_abs_cpu_gpu=d_cg, max_abs_gpu_ref=d_ref, ok=d_cg <= 1e-4 and d_ref <= 1e-4)))
raise SystemExit(0 if d_cg <= 1e-4 and d_ref <= 1e-4 else 1)
EOF

# ---- 3. model throughput ------------------------------------------------------------------------------------
MT=(benchmarks/model_throughput.py --device cuda --precision bf16 --batch-size 32 --models evl-b16-8f)
run throughput_bf16 90 "$PY" "${MT[@]}" --json "$OUT/throughput_bf16.json"
run throughput_bf16_compile 120 "$PY" "${MT[@]}" --compile --no-ablations --json "$OUT/throughput_bf16_compile.json"

# ---- 4. training (random tower: no --pretrained, synthetic clips held in memory), bf16 and fp16 + scaler; stop and resume ----
for prec in bf16 fp16; do
  [ "$DRY" = 1 ] || rm -rf "$OUT/train_$prec"        # a fresh run each time: stop at 100, then resume to 200
  TR=(-m evl_nb.train --dataset synthetic --data-root "$OUT/synthetic" --model evl-b16-8f
      --in-memory --precision "$prec" --batch-size 16 --max-steps 200 --warmup-steps 20 --ckpt-every 50
      --log-every 20 --num-workers 2 --no-progress --device cuda --seed 0 --output-dir "$OUT/train_$prec")
  run "train_${prec}_first100" 60 "$PY" "${TR[@]}" --stop-at-step 100
  run "train_${prec}_resume" 50 "$PY" "${TR[@]}" --resume auto --summary-json "$OUT/train_$prec/summary_copy.json"
  run "train_${prec}_check" 10 "$PY" - "$OUT/train_$prec" <<'EOF'
import csv, json, math, sys
from pathlib import Path
d = Path(sys.argv[1])
rows = [r for r in csv.DictReader(open(d / 'metrics.csv')) if r['kind'] == 'train' and r['loss'] not in ('', None)]
loss = {int(r['step']): float(r['loss']) for r in rows}       # the resumed run rewrites steps after the checkpoint
steps = sorted(loss); v = [loss[s] for s in steps]
ckpts = sorted(p.name for p in d.rglob('step_*.pt'))
first, last = sum(v[:20]) / len(v[:20]), sum(v[-20:]) / len(v[-20:])
out = dict(steps=len(steps), last_step=steps[-1], loss_first20=round(first, 4), loss_last20=round(last, 4),
           finite=all(math.isfinite(x) for x in v), falling=last < first, checkpoints=ckpts,
           resumed_to_200=steps[-1] == 200 and 100 in steps)
print('KEYS', json.dumps(out))
sys.exit(0 if out['finite'] and out['falling'] and ckpts and out['resumed_to_200'] else 1)
EOF
done

# ---- 5. the clip store's GPU decode rate -------------------------------------------------------------------
run data_throughput 45 "$PY" benchmarks/data_throughput.py --repeats 3
# the augment_on split with device_augment_cuda (the device share of a batch of 32 on CUDA)
run augment_throughput 60 "$PY" benchmarks/data_throughput.py --augment-only --repeats 3 --json "$OUT/augment_throughput.json"

# ---- 6. the `#| cuda` notebook cells (settings.ini's tst_flags skips them everywhere else) ------------------
CUDA_NBS=$(grep -l '#| cuda' nbs/*.ipynb 2>/dev/null | tr '\n' ' ')
if [ -n "$CUDA_NBS" ]; then
  run nbdev_test_cuda 60 bash -c "rc=0; for nb in $CUDA_NBS; do \"$ROOT/.venv/bin/nbdev_test\" --flags cuda \
--do_print --path \"\$nb\" || rc=1; done; exit \$rc"
fi

# ---- 7. the `make test-fast` tier with the GPU visible (last: the least GPU-specific, takes what is left) ----
run pytest_rest 200 "$PY" -m pytest -q -rs -m "not slow and not demo and not browser and not cuda"
# ---- summary: OUT_DIR/gpu_check.json -------------------------------------------------------------------------
SUMPY=$PY; [ -x "$SUMPY" ] || SUMPY=python3
"$SUMPY" - "$OUT" "$DRY" <<'EOF' 2>&1 | tee -a "$LOG"
import json, re, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == '1'
res = {}
for line in (out / 'steps.tsv').read_text().splitlines():
    name, rc, sec, _ = line.split('\t')
    r = dict(rc=int(rc), seconds=int(sec)); res[name] = r
    f = out / f'{name}.out'
    txt = f.read_text(errors='replace') if f.exists() else ''
    for l in txt.splitlines():                          # KEYS {...} lines of the inline checks
        if l.startswith('KEYS '):
            try: r.update(json.loads(l[5:]))
            except ValueError: pass
    if name.startswith('pytest') or name.startswith('nbdev'):
        m = re.findall(r'(\d+) (passed|failed|skipped|deselected|error|errors)', txt[-3000:])
        r.update({k: int(n) for n, k in m})
    if name.startswith('throughput'):
        j = out / f'{name}.json'
        if j.exists():
            try: r['results'] = json.loads(j.read_text())
            except ValueError: pass
        r['tail'] = txt.splitlines()[-25:]
    if name == 'data_throughput':
        r['gpu_lines'] = [l for l in txt.splitlines() if 'GPU' in l or 'nvjpeg' in l]
    if name.startswith('train_') and not name.endswith('check'):
        r['tail'] = txt.splitlines()[-5:]
summary = dict(dry=dry, steps=res, failed=[k for k, v in res.items() if v['rc'] != 0])
(out / 'gpu_check.json').write_text(json.dumps(summary, indent=1, default=str))
print('gpu_check.json:', {k: v['rc'] for k, v in res.items()}, 'failed:', summary['failed'])
EOF
log "done in $((SECONDS - START))s (budget ${BUDGET}s): $OUT/gpu_check.json"
