#!/usr/bin/env bash
# The main job in one command, from a fresh clone:
#
#   bash scripts/demo.sh
#
# 1. install: .venv (created if missing) with the CPU build of torch (the CUDA build
#    when `nvidia-smi` sees a GPU) and the project's server extra, as the README says;
#    skipped when .venv already has it for this pyproject.toml;
# 2. model: a pretrained ESM-2 (esm2_t6_8M_UR50D) from the local torch hub cache or a
#    download when one is possible; otherwise a seeded random-weight checkpoint of
#    that architecture (rankings from it are meaningless; a banner says so);
# 3. index: E. coli K-12 proteins from ../shared/data (the first DEMO_SEQUENCES, default
#    1000; `all` for the whole proteome) into a versioned root, E-values on; a second
#    run rebuilds it reusing every vector;
# 4. serve: `esmsearch serve` with gRPC and the HTTP API / web page on free loopback ports;
# 5. search: yeast proteins through the CLI (TSV) and through the Python client;
# 6. the index info and the web page's address; the server is stopped on exit,
#    Ctrl-C or failure (no process left behind).
#
# Exits non-zero on any failure, naming the step. Environment: DEMO_SEQUENCES (number
# of E. coli proteins or `all`), DEMO_QUERIES (yeast proteins, default 3), DEMO_MODEL
# (a --model value to use instead of step 2's choice), DEMO_WORK (default work/demo),
# DEMO_SKIP_INSTALL=1 (no venv, no install: the python on PATH as it is; the tests run the demo so).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$(pwd)
DATA="$ROOT_DIR/../shared/data/seqdb"
WORK=${DEMO_WORK:-work/demo}
SEQUENCES=${DEMO_SEQUENCES:-1000}
QUERIES=${DEMO_QUERIES:-3}
STEP="start"
SERVER_PID=""
SERVED=0
T0=$(date +%s)

step() {
    STEP="$1"
    printf '\n== [%ss] %s\n' "$(($(date +%s) - T0))" "$1"
}
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
on_exit() {
    rc=$?
    stop_server
    if [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then
        echo "demo.sh: interrupted at step: $STEP (server stopped)" >&2
    elif [ "$rc" -ne 0 ]; then
        echo "demo.sh: FAILED at step: $STEP (exit $rc)" >&2
        if [ "$SERVED" = 1 ]; then
            echo "--- last lines of $WORK/serve.log:" >&2
            tail -5 "$WORK/serve.log" >&2
        fi
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ -d "$DATA" ] || { STEP="data"; echo "demo.sh: no data at $DATA (the shared data folder next to the clone)" >&2; exit 1; }
mkdir -p "$WORK"

# -- 1. install -------------------------------------------------------------------------------
step "1/6 install (.venv)"
STAMP=".venv/.esmsearch-demo-$(sha256sum pyproject.toml | cut -c1-16)"
if [ "${DEMO_SKIP_INSTALL:-0}" = 1 ]; then
    echo "install skipped (DEMO_SKIP_INSTALL=1): using $(command -v python) as it is"
else
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
if [ "${DEMO_SKIP_INSTALL:-0}" = 1 ]; then
    :
elif [ -f "$STAMP" ] && python -c "import esmsearch.server, faiss, esm, torch" 2>/dev/null; then
    echo "already installed (delete $STAMP to reinstall)"
else
    python -m pip install --quiet --upgrade pip
    if python -c "import torch" 2>/dev/null; then
        echo "torch $(python -c 'import torch; print(torch.__version__)') already in .venv"
    elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install --quiet torch            # a CUDA build for the GPU nvidia-smi sees
    else
        python -m pip install --quiet torch==2.13.0    # the CPU build (a bare `torch` pulls CUDA)
    fi
    python -m pip install --quiet -e ".[server]"
    touch "$STAMP"
fi
echo "esmsearch $(python -c 'import esmsearch; print(esmsearch.__version__)'), torch $(python -c 'import torch; print(torch.__version__)')"

# -- 2. model ---------------------------------------------------------------------------------
step "2/6 model"
MODEL=${DEMO_MODEL:-}
RANDOM_WEIGHTS=0
if [ -z "$MODEL" ]; then
    if python - <<'EOF'
import os, sys, urllib.request
import torch
cached = os.path.join(torch.hub.get_dir(), "checkpoints", "esm2_t6_8M_UR50D.pt")
if os.path.exists(cached):
    print(f"pretrained esm2_t6_8M_UR50D in the torch hub cache: {cached}")
    sys.exit(0)
try:  # fair-esm downloads from here on first use
    req = urllib.request.Request("https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt", method="HEAD")
    urllib.request.urlopen(req, timeout=5)
    print("pretrained esm2_t6_8M_UR50D: downloading through fair-esm (31 MB)")
    sys.exit(0)
except Exception:
    sys.exit(1)
EOF
    then
        MODEL=esm2_t6_8M_UR50D
    else
        MODEL="$WORK/checkpoints/esm2_t6_8M_UR50D.pt"
        RANDOM_WEIGHTS=1
        [ -f "$MODEL" ] || python -m esmsearch.checkpoints esm2_t6_8M_UR50D -o "$WORK/checkpoints" --seed 0 >/dev/null
        cat <<EOF
################################################################################
#  No pretrained ESM-2 weights here (no torch hub cache, no download).        #
#  Using a SEEDED RANDOM-WEIGHT esm2_t6_8M_UR50D checkpoint: the pipeline,    #
#  speed and memory are real, but the RANKINGS AND E-VALUES ARE MEANINGLESS.  #
#  Self-hits aside, hits below are noise.                                     #
################################################################################
EOF
    fi
fi
echo "model: $MODEL"

# -- 3. index ---------------------------------------------------------------------------------
step "3/6 index E. coli (${SEQUENCES} proteins)"
python - "$DATA/UP000000625_83333_Ecoli_K12_2020.fasta" "$WORK/ecoli.fasta" "$SEQUENCES" \
    "$DATA/UP000002311_559292_yeast.fasta.gz" "$WORK/yeast.fasta" "$QUERIES" <<'EOF'
import gzip, sys
from itertools import islice
from Bio import SeqIO
def subset(src, dst, n):
    opener = gzip.open if src.endswith(".gz") else open
    with opener(src, "rt") as fh:
        records = SeqIO.parse(fh, "fasta")
        chosen = list(records if n == "all" else islice(records, int(n)))
    tmp = dst + ".tmp"
    SeqIO.write(chosen, tmp, "fasta")
    import os
    os.replace(tmp, dst)
    return len(chosen), sum(len(r) for r in chosen)
n, res = subset(sys.argv[1], sys.argv[2], sys.argv[3])
print(f"database: {n} E. coli proteins, {res:,} residues -> {sys.argv[2]}")
q, qres = subset(sys.argv[4], sys.argv[5], sys.argv[6])
print(f"queries: {q} yeast proteins, {qres:,} residues -> {sys.argv[5]}")
EOF
esmsearch index build "$WORK/ecoli.fasta" --root "$WORK/ecoli-root" --model "$MODEL" --keep 2 --no-progress 2>"$WORK/build.log" \
    || { cat "$WORK/build.log" >&2; exit 1; }

# -- 4. serve ---------------------------------------------------------------------------------
step "4/6 serve"
: >"$WORK/serve.out"
esmsearch serve "$WORK/ecoli-root" --port 0 --http-port 0 >"$WORK/serve.out" 2>"$WORK/serve.log" &
SERVER_PID=$!
SERVED=1
echo "$SERVER_PID" >"$WORK/serve.pid"
for _ in $(seq 1 600); do
    grep -q "^HTTP API" "$WORK/serve.out" && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server exited during start" >&2; exit 1; }
    sleep 0.1
done
grep -q "^HTTP API" "$WORK/serve.out" || { echo "the server did not start within 60 s" >&2; exit 1; }
cat "$WORK/serve.out"
ADDRESS=$(sed -n 's/^serving .* on \(.*\)$/\1/p' "$WORK/serve.out")
WEB=$(sed -n 's/^HTTP API and web page on \(.*\)$/\1/p' "$WORK/serve.out")

# -- 5. search --------------------------------------------------------------------------------
step "5/6 search yeast proteins: CLI (TSV)"
esmsearch search "$WORK/yeast.fasta" --server "$ADDRESS" -k 3 --format tsv | cut -f1-7
step "5/6 search yeast proteins: Python client"
python - "$ADDRESS" "$WORK/yeast.fasta" <<'EOF'
import sys
from esmsearch.client import SearchClient

with SearchClient(sys.argv[1]) as client:
    info = client.index_info()
    for result in client.search(sys.argv[2], k=2):
        for hit in result.hits:
            print(f"{result.query_id} -> {hit.target_id}  cosine {hit.cosine_score:.4f}  E-value {hit.evalue:.3g}")
print(f"answered by index version {info.index_version} ({info.count} sequences, model {info.model_name})")
EOF

# -- 6. info, web page, stop ------------------------------------------------------------------
step "6/6 index info, web page, stop"
esmsearch index info "$WORK/ecoli-root"
echo
echo "web page and HTTP API (while the server runs): $WEB"
stop_server
echo "server stopped"
if [ "$RANDOM_WEIGHTS" = 1 ]; then
    echo "reminder: random-weight model: the rankings above are meaningless (pipeline demo only)"
fi
printf '\ndemo finished in %ss\n' "$(($(date +%s) - T0))"
