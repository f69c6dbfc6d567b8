#!/usr/bin/env bash
# benchmarks/gpu_smoke.sh: the first run on a GPU machine, in one go (under 8 minutes on an H100/H200).
#   1. the tiny pipeline end to end on 1 GPU: prepare, train-lm, train-sae with the producer's LM on
#      the GPU for 300 steps (configs/tiny.toml);
#   2. the SAE step benchmark (benchmarks/bench_step.py) at n_features 16384 and 131072, B 4096, fp32
#      and bf16: vectors/s of the dense and the sparse step against the GEMM ceiling of the same GPU;
#   3. with >= 2 GPUs: 2 processes under `accelerate launch` (launch/run.sh), weights equal on both ranks.
# It prints one table and writes <out>/gpu_smoke.json (+ each stage's log in <out>/logs/).
#
#   bash benchmarks/gpu_smoke.sh [--out DIR] [--budget SECONDS]   # on the GPU machine
#   bash benchmarks/gpu_smoke.sh --cpu                            # dry run: same steps, CPU, small shapes
#   bash benchmarks/gpu_smoke.sh --install                        # first `pip install -e '.[test]'`
#
# It installs nothing itself unless --install is given, and then only the README's install (torch
# must already be there: the build for your CUDA). Each stage has its own `timeout`, and no stage
# starts past the budget (default 470 s on a GPU, 1500 s with --cpu). Exit 0 when every stage that
# ran passed. Run from anywhere; it works in a temp dir it removes (--keep keeps it).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CPU=0 INSTALL=0 KEEP=0 OUT="" BUDGET=""
while (( $# )); do
    case "$1" in
        --cpu) CPU=1 ;;
        --install) INSTALL=1 ;;
        --keep) KEEP=1 ;;
        --out) OUT="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-$REPO/benchmarks/results/gpu_smoke$([[ $CPU == 1 ]] && echo -cpu)}"
BUDGET="${BUDGET:-$([[ $CPU == 1 ]] && echo 1500 || echo 470)}"
mkdir -p "$OUT/logs" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/monosem-smoke.XXXXXX")"
[[ $KEEP == 1 ]] || trap 'rm -rf "$WORK"' EXIT
export TMPDIR="$WORK" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGES="$OUT/stages.tsv"
: > "$STAGES"
START=$SECONDS

# stage NAME LIMIT_S CMD...: run CMD with a timeout (capped by what is left of the budget), log its
# output to logs/NAME.log, append "name rc wall_s" to the stage list. Returns CMD's exit code.
stage() {
    local name="$1" limit="$2"; shift 2
    local left=$(( BUDGET - (SECONDS - START) ))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        printf '%s\t%s\t%s\n' "$name" skipped 0 >> "$STAGES"
        echo "== $name: skipped (budget of ${BUDGET} s spent)" >&2
        return 1
    fi
    echo "== $name (timeout ${limit} s)" >&2
    local t0=$EPOCHREALTIME rc=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
    local wall; wall=$("$PYTHON" -c "print(round($EPOCHREALTIME - $t0, 1))")
    printf '%s\t%s\t%s\n' "$name" "$rc" "$wall" >> "$STAGES"
    (( rc == 0 )) || { echo "   exit $rc; last lines of $OUT/logs/$name.log:" >&2; tail -n 15 "$OUT/logs/$name.log" >&2; }
    return $rc
}

cd "$REPO" || exit 2
if [[ $INSTALL == 1 ]]; then  # the README's install, nothing else
    stage install 300 "$PYTHON" -m pip install -e '.[test]' || exit 1
fi
if [[ $CPU == 1 ]]; then
    export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    DEVICE=cpu STEPS=40 FEATURES="1024 4096" BATCH=256 BENCH_STEPS=5
else
    DEVICE=cuda STEPS=300 FEATURES="16384 131072" BATCH=4096 BENCH_STEPS=50
fi
stage env 60 "$PYTHON" - "$DEVICE" <<'EOF' || exit 1
import sys, torch, accelerate, monosem
print(f"python {sys.version.split()[0]} torch {torch.__version__} accelerate {accelerate.__version__} "
      f"monosem {monosem.__file__}")
n = torch.cuda.device_count()
print(f"cuda {torch.version.cuda} available {torch.cuda.is_available()} devices {n}: "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(n)))
if sys.argv[1] == "cuda" and n == 0:
    sys.exit("no CUDA GPU visible (run with --cpu for the dry run)")
EOF
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)

# 1. the tiny pipeline (real shards of the stdlib corpus, a real LM, real producers)
RUN=(--run.root="$WORK/runs" --run.name=tiny)
SAE=(--train_sae.steps="$STEPS" --train_sae.log_every=10 --train_sae.eval_every=100
     --train_sae.ckpt_every=150 --train_sae.resample_steps=[100] --buffer.producer_device=auto)
stage prepare 120 "$PYTHON" -m monosem prepare configs/tiny.toml "${RUN[@]}" \
  && stage train-lm 150 "$PYTHON" -m monosem train-lm configs/tiny.toml "${RUN[@]}" \
  && stage train-sae 200 env CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-0}" \
        "$PYTHON" -m monosem train-sae configs/tiny.toml "${RUN[@]}" "${SAE[@]}"
TINY_OK=$?

# 2. the SAE step benchmark (benchmarks/bench_step.py): fp32 and bf16 at each n_features, B = $BATCH
BENCH=("$PYTHON" benchmarks/bench_step.py --batch "$BATCH" --dtypes fp32 bf16 --steps "$BENCH_STEPS")
[[ $CPU == 1 ]] && BENCH+=(--l0 0.01 --gemm-reps 2)
if [[ $DEVICE == cuda ]] && ! "$PYTHON" benchmarks/bench_step.py --help 2>/dev/null | grep -q -- --device; then
    for m in $FEATURES; do printf '%s\t%s\t%s\n' "bench-m$m" "skipped (bench_step.py has no --device)" 0 >> "$STAGES"; done
else
    [[ $DEVICE == cuda ]] && BENCH+=(--device cuda)
    for m in $FEATURES; do
        stage "bench-m$m" 150 env CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES-0}" \
            "${BENCH[@]}" --n-features "$m" --out "$OUT/bench-m$m.json"
    done
fi

# 3. two processes under accelerate launch (2 GPUs; the dry run: 2 CPU processes over gloo)
if (( TINY_OK != 0 )); then
    printf '%s\t%s\t%s\n' two-processes skipped 0 >> "$STAGES"
elif [[ $CPU == 1 ]] || (( GPUS >= 2 )); then
    stage two-processes 200 env NPROC_PER_NODE=2 CONFIG=configs/tiny.toml \
        bash launch/run.sh "${RUN[@]}" "${SAE[@]}" --train_sae.out=sae-2proc
else
    printf '%s\t%s\t%s\n' two-processes "skipped (1 GPU)" 0 >> "$STAGES"
fi

# the table and the JSON
"$PYTHON" - "$OUT" "$DEVICE" "$BUDGET" <<'EOF'
import json, re, sys
from pathlib import Path

out, device, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
log = lambda name: (out / "logs" / f"{name}.log").read_text(errors="replace") if (out / "logs" / f"{name}.log").is_file() else ""
last = lambda pattern, text: (re.findall(pattern, text) or [""])[-1]


def figure(name: str) -> tuple[str, dict]:
    text = log(name)
    if name == "env":
        return text.strip().splitlines()[-1] if text.strip() else "", {"log": text.strip()}
    if name == "prepare":
        line = last(r"prepare: .*tokens read.*", text)
        return line[:110], {"line": line}
    if name == "train-lm":
        line = last(r"LM: step .*", text)
        return line[:110], {"line": line}
    if name in ("train-sae", "two-processes"):
        ids = dict(re.findall(r"rank (\d+) weights: (.+)", text))
        summary = last(r"  sae: loss=.*", text).strip()
        rate = last(r"vec/s (\d+)", text)
        same = len(set(ids.values())) == 1 if ids else None
        keep = dict(re.findall(r"(loss|l0|fvu|dead_frac|loss_recovered)=([^,]+)", summary))
        fig = " ".join(f"{k}={v}" for k, v in keep.items()) + f" | {rate} vec/s" + (
            "" if len(ids) < 2 else f" | ranks equal: {same}")
        return fig, {"summary": summary, "vectors_per_s_last_window": float(rate or "nan"),
                     "rank_identities": ids, "ranks_equal": same}
    if name.startswith("bench-"):
        path = out / f"{name}.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        parts = [f"{r['dtype']}: dense {r['dense']['vectors_per_s']:,.0f} v/s = "
                 f"{r['dense_over_ceiling']:.0%} of GEMM ceiling {r['ceiling_vectors_per_s']:,.0f}; "
                 f"sparse {r['sparse'][0]['vectors_per_s']:,.0f}" for r in data.get("results", [])]
        return " | ".join(parts), data
    return "", {}


rows, stages = [], []
for line in (out / "stages.tsv").read_text().splitlines():
    name, rc, wall = line.split("\t")
    status = "ok" if rc == "0" else (rc if rc.startswith("skipped") else f"FAILED (exit {rc})")
    fig, detail = figure(name)
    if name in ("train-sae", "two-processes") and rc == "0" and detail.get("ranks_equal") is False:
        status = "FAILED (ranks differ)"
    rows.append((name, status, wall, fig))
    stages.append({"stage": name, "status": status, "wall_s": float(wall), "detail": detail})
result = {"device": device, "budget_s": budget, "stages": stages,
          "passed": all(s["status"] == "ok" or s["status"].startswith("skipped (") for s in stages)}
(out / "gpu_smoke.json").write_text(json.dumps(result, indent=2) + "\n")
w = [max(len(r[i]) for r in rows + [("stage", "status", "wall s", "figure")]) for i in range(3)]
print(f"{'stage':<{w[0]}}  {'status':<{w[1]}}  {'wall s':>{w[2]}}  figure")
for name, status, wall, fig in rows:
    print(f"{name:<{w[0]}}  {status:<{w[1]}}  {wall:>{w[2]}}  {fig}")
print(f"JSON: {out / 'gpu_smoke.json'}  ({'PASSED' if result['passed'] else 'FAILED'})")
sys.exit(0 if result["passed"] else 1)
EOF
