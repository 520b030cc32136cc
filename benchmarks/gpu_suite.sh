#!/usr/bin/env bash
# The GPU measurements of esmsearch in one run, into one results file.
#
#   benchmarks/gpu_suite.sh [--device cuda|cpu] [--smoke] [--threads N] [--out DIR]
#
# 1. Embedding throughput, packed, against fair-esm's reference on the same device:
#    esm2_t6_8M, esm2_t12_35M and esm2_t33_650M in fp32, bf16 and fp16, with achieved
#    FLOP/s, utilisation of the device's own matrix-product rate at the model's shapes,
#    and MFU against the dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
# 2. benchmarks/serve_load.py at 1, 8 and 32 clients, batching on and off
#    (esm2_t33_650M, 500-protein E. coli index, yeast queries <= 500 residues).
# 3. SCOPe 2.08 (Progres protocol, 400 x 15,177) through the real server, esm2_t33_650M
#    at bf16 (random weights: speed only), against MMseqs2 -s 7.5 on all CPU cores.
#
# Every model holds seeded random weights of the named architecture: speed figures are
# real, retrieval quality is not. Needs: the project's Python dependencies (fair-esm,
# faiss, grpcio >= 1.85.1, ...), mmseqs on PATH for step 3, and the data folder
# ../shared/data beside the repository. --smoke runs tiny sizes (for CI-less checks of
# this script on a CPU); --device cpu runs everything on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
SMOKE=0
THREADS=$(nproc)
OUTDIR=benchmarks/results/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --threads) THREADS=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
RESULTS="$OUTDIR/gpu_suite_results.txt"
: > "$RESULTS"
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$RESULTS"; }
step() {  # step TIMEOUT_S CMD...: run, tee into the results file, never stop the suite
  local limit=$1; shift
  say ""
  say "\$ $*   # $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v -E "^\s*$|it/s\]|res/s\]" | tee -a "$RESULTS"
  say "# exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

say "# esmsearch GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE, smoke $SMOKE"
say "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "# CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$RESULTS"
fi
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'varlen', __import__('importlib.util').util.find_spec('torch.nn.attention.varlen') is not None)" \
  2>&1 | tee -a "$RESULTS"

if [ "$SMOKE" = 1 ]; then
  ARCHS="esm2_t6_8M_UR50D"; NSEQ=20; LEVELS=1,2; SECS=2; SERVE_ARCH=esm2_t6_8M_UR50D; DB=40
  SCOP_ARGS=(--max-queries 10 --max-targets 200); SCOP_ARCH=esm2_t6_8M_UR50D
else
  ARCHS="esm2_t6_8M_UR50D esm2_t12_35M_UR50D esm2_t33_650M_UR50D"; NSEQ=300; LEVELS=1,8,32; SECS=10
  SERVE_ARCH=esm2_t33_650M_UR50D; DB=500; SCOP_ARGS=(); SCOP_ARCH=esm2_t33_650M_UR50D
fi
PRECISIONS=fp32,bf16,fp16
[ "$DEVICE" = cpu ] && PRECISIONS=fp32

say ""
say "## 1. Embedding throughput (packed) vs fair-esm extract.py, same device"
for arch in $ARCHS; do
  step 600 python3 benchmarks/embed_throughput.py --arch "$arch" --device "$DEVICE" --n-seqs "$NSEQ" \
    --precisions "$PRECISIONS" --repeats 2 --toks-per-batch 16384
done

say ""
say "## 2. Serving under load ($SERVE_ARCH, $DB-protein E. coli index, yeast queries <= 500 residues)"
step 900 python3 benchmarks/serve_load.py --arch "$SERVE_ARCH" --device "$DEVICE" --db-limit "$DB" \
  --seconds "$SECS" --levels "$LEVELS" --n-queries 64 --modes on,off --bounded-in-flight 0 --paired-seconds "$SECS"

say ""
say "## 3. SCOPe 2.08, 400 x 15,177, through the server ($SCOP_ARCH); MMseqs2 on $THREADS CPU threads"
if command -v mmseqs >/dev/null; then
  step 1200 python3 benchmarks/scop_sensitivity.py --tools mmseqs2,esmsearch --device "$DEVICE" \
    --arch "$SCOP_ARCH" --precision "$([ "$DEVICE" = cpu ] && echo fp32 || echo bf16)" \
    --threads "$THREADS" --toks-per-batch 16384 --out "$OUTDIR" "${SCOP_ARGS[@]}"
else
  say "mmseqs not on PATH: step 3 skipped"
fi
say ""
say "# done $(date -u +%H:%M:%S)"
