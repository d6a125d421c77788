#!/usr/bin/env bash
# One prepared run for a session that has a GPU machine (issue 7), from the repository root:
#
#     OUT=/some/empty/dir bash bench/gpu_session.sh        # the device tool sets OUT itself
#
# Steps, each under `timeout`, each one's exit code logged to $OUT/summary.txt; a failing step
# does not stop the others (set -u only, no set -e):
#   1. environment: nvidia-smi (with the PCIe link), Python, torch/CUDA/cuDNN    -> env.log
#   2. an interpreter whose torch sees CUDA: $PY if set, else .venv/bin/python, else python3
#      (the GPU image's, which holds torch; nothing can be downloaded there), else `make dev`
#      (only where a registry is reachable); then the project installed into it offline
#      (pip install --no-deps --no-build-isolation --no-index -e .) and pytest-asyncio from
#      bench/gpu_wheels/ if missing                                                -> env.log
#   3. python -m pytest tests/gpu -q -rfE [--timeout 60] (every failure, not just the first),
#      then examples/gpu_stream.py eager and --graphs                               -> gpu_tests.log
#   4. python bench/gpu_overlap.py (recorded in bench/RESULTS.md)                   -> gpu_overlap.log/.json
#   5. python bench/gpu_graphs.py (eager vs CUDA graphs, inference and learning; recorded) -> gpu_benches.log
#   6. python bench/hop_overhead.py --device cuda (recorded as hop_overhead_cuda)    -> gpu_benches.log
#   6b. python bench/depth.py --parts c: DeepPCR and Jacobi vs sequential on the GPU (issue 21;
#      recorded)                                                                   -> gpu_benches.log
#   7. with the budget left: the CPU benchmarks of issues 2 and 5 pinned to two physical cores
#      of this host (a quiet machine with real cores, which the shared 2-vCPU CI VM is not):
#      cpu_scaling.py, then metrics_overhead.py (recorded; `taskset`)             -> cpu_benches.log
#   8. bench/RESULTS.md copied to $OUT (also right after step 4)                     -> RESULTS.md
# At most 8 files come back from $OUT; this writes at most 8. The whole script keeps within
# GPU_SESSION_BUDGET_S seconds (default 450: a session has 15 minutes of device time in all,
# machine start included; run it with timeout_s=500); a step that would not fit is skipped
# and says so. Expected on an H100/H200: about 300-400 s.
#
# Knobs (environment): PY (the interpreter), GPU_SESSION_BUDGET_S, GPU_OVERLAP_ARGS (extra
# arguments for gpu_overlap.py, e.g. "--frames 500"), GPU_SESSION_ALLOW_CPU=1 (a dry run of the
# script itself on a machine without CUDA: a CPU torch is accepted, with GPU_OVERLAP_ARGS=--quick
# gpu_overlap takes its CPU smoke path, and tests/gpu collects nothing).
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
BUDGET=${GPU_SESSION_BUDGET_S:-450}
T0=$(date +%s)
SUMMARY=$OUT/summary.txt
ENVLOG=$OUT/env.log
: >"$SUMMARY"

log() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - T0))s] $*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }

# step NAME MAX_SECONDS LOGFILE COMMAND...: COMMAND under timeout min(MAX, budget left - 20 s),
# output appended to LOGFILE; returns COMMAND's exit code (124: timed out; 99: skipped).
step() {
    local name=$1 max=$2 logf=$3
    shift 3
    local t=$(($(left) - 20))
    ((t > max)) && t=$max
    if ((t < 15)); then
        log "$name: SKIPPED, only $(left) s of the budget left"
        return 99
    fi
    log "$name: start (timeout ${t}s): $*"
    echo "\$ $*" >>"$logf"
    timeout -k 10 "$t" "$@" >>"$logf" 2>&1
    local rc=$?
    if ((rc == 124 || rc == 137)); then
        log "$name: rc=$rc (TIMED OUT after ${t}s)"
    else
        log "$name: rc=$rc"
    fi
    return $rc
}

log "gpu_session: repo $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --short 2>/dev/null | wc -l) changed files; budget ${BUDGET}s; OUT=$OUT"

# -- 1. environment ------------------------------------------------------------------------------
{
    echo "== date: $(date -u)"
    echo "== uname: $(uname -a)"
    echo "== nproc: $(nproc)"
    echo "== nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed: rc=$?"
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,clocks.sm,clocks.max.sm,clocks.mem \
        --format=csv || true
    echo "== python3: $(command -v python3) $(python3 --version 2>&1)"
} >>"$ENVLOG" 2>&1
log "environment: rc=0 (nvidia-smi and versions in env.log)"

# -- 2. interpreter and install -----------------------------------------------------------------
has_cuda_torch() {
    "$1" -c 'import os, sys, torch
sys.exit(0 if torch.cuda.is_available() or os.environ.get("GPU_SESSION_ALLOW_CPU") == "1" else 1)' >/dev/null 2>&1
}
PY=${PY:-}
if [ -n "$PY" ] && ! has_cuda_torch "$PY"; then
    log "PY=$PY given, but its torch does not see CUDA; looking for another"
    PY=""
fi
if [ -z "$PY" ]; then
    for cand in .venv/bin/python python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && has_cuda_torch "$cand"; then
            PY=$cand
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    # No interpreter with CUDA torch: the Makefile's way (needs python3.11 and a reachable
    # registry; on such a machine pip pulls the CUDA build of the pinned torch, as intended).
    step "make dev" 300 "$ENVLOG" make dev
    if has_cuda_torch .venv/bin/python; then PY=.venv/bin/python; fi
fi
if [ -z "$PY" ]; then
    log "FATAL: no Python whose torch sees CUDA; nothing else can run (see env.log)"
    cp bench/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
    exit 1
fi
log "interpreter: $PY ($(command -v "$PY"))"
{
    echo "== interpreter: $PY"
    "$PY" -c 'import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("devices", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
p = torch.cuda.get_device_properties(0)
print("device 0:", p.name, f"{p.total_memory / 2**30:.1f} GiB,", p.multi_processor_count, "SMs, cc", f"{p.major}.{p.minor}")'
} >>"$ENVLOG" 2>&1

if ! "$PY" -c 'import partime_async.sources, partime_async.sinks' >/dev/null 2>&1; then
    step "install project (offline, editable)" 120 "$ENVLOG" \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
    if ! "$PY" -c 'import partime_async.sources, partime_async.sinks' >>"$ENVLOG" 2>&1; then
        # Last resort on this throwaway machine: the package-dir mapping of pyproject.toml
        # (partime_async.sources -> sources/, .sinks -> sinks/) as links, for runs from the root.
        ln -sfn ../sources partime_async/sources && ln -sfn ../sinks partime_async/sinks
        log "project import failed after pip; linked partime_async/sources and /sinks instead"
    fi
fi
if ! "$PY" -c 'import pytest_asyncio' >/dev/null 2>&1; then
    # pytest-asyncio >= 1.0 needs pytest >= 8.4; 0.24 covers 8.2 - 8.x.
    if "$PY" -c 'import sys, pytest; sys.exit(0 if tuple(map(int, pytest.__version__.split(".")[:2])) >= (8, 4) else 1)' 2>/dev/null; then
        wheel=$(ls bench/gpu_wheels/pytest_asyncio-1.*.whl | head -1)
    else
        wheel=$(ls bench/gpu_wheels/pytest_asyncio-0.*.whl | head -1)
    fi
    step "install pytest-asyncio (offline)" 60 "$ENVLOG" "$PY" -m pip install --no-deps --no-index "$wheel"
    if ! "$PY" -c 'import pytest_asyncio' >/dev/null 2>&1; then  # e.g. a read-only site-packages
        step "install pytest-asyncio (offline, --target /tmp/gpu_site)" 60 "$ENVLOG" \
            "$PY" -m pip install --no-deps --no-index --target /tmp/gpu_site "$wheel"
        export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
{
    echo "== imports"
    for mod in partime_async partime_async.sources partime_async.sinks numpy aiofiles matplotlib uvloop \
        prometheus_client pytest pytest_asyncio pytest_timeout hypothesis aiohttp; do
        "$PY" -c "import $mod, sys; print('$mod', getattr(sys.modules['$mod'], '__version__', ''))" 2>&1 | tail -1
    done
} >>"$ENVLOG" 2>&1
log "imports checked (env.log)"

# -- 3. tests/gpu ----------------------------------------------------------------------------------
# pytest-timeout, where the machine has it, stops a hung test instead of the whole step.
TIMEOUT_ARGS=()
"$PY" -c 'import pytest_timeout' >/dev/null 2>&1 && TIMEOUT_ARGS=(--timeout 60)
step "tests/gpu" 150 "$OUT/gpu_tests.log" "$PY" -m pytest tests/gpu -q -rfE ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"}

# The GPU example, eager and graphed, 1080p (its output joins the tests' log).
step "examples/gpu_stream.py" 40 "$OUT/gpu_tests.log" "$PY" examples/gpu_stream.py --frames 300
step "examples/gpu_stream.py --graphs" 40 "$OUT/gpu_tests.log" "$PY" examples/gpu_stream.py --frames 300 --graphs

# -- 4. bench/gpu_overlap.py ---------------------------------------------------------------------
# One window (the device's depth bounds the GPU queue now): 16 setups (pageable/pinned x 1/2
# stages x graphs off/on x asyncio/uvloop) + 2 naive loops, 3 repeats.
# shellcheck disable=SC2086  # GPU_OVERLAP_ARGS is split on purpose
step "bench/gpu_overlap.py" 200 "$OUT/gpu_overlap.log" "$PY" bench/gpu_overlap.py --json "$OUT/gpu_overlap.json" \
    ${GPU_OVERLAP_ARGS:---windows 2 --repeats 3}
cp bench/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null

# -- 5. bench/gpu_graphs.py ----------------------------------------------------------------------
step "bench/gpu_graphs.py" 80 "$OUT/gpu_benches.log" "$PY" bench/gpu_graphs.py --frames 500 --repeats 5

# -- 6. bench/hop_overhead.py --device cuda ------------------------------------------------------
step "bench/hop_overhead.py --device cuda" 90 "$OUT/gpu_benches.log" \
    "$PY" bench/hop_overhead.py --device cuda --repeats 3

# -- 6b. bench/depth.py on the GPU (issue 21) ------------------------------------------------------
step "bench/depth.py --parts c" 120 "$OUT/gpu_benches.log" "$PY" bench/depth.py --parts c --repeats 3

# -- 7. CPU benchmarks on two quiet physical cores (issues 2 and 5), if the budget allows ---------
# Two CPUs of different physical cores (no SMT siblings), avoiding CPU 0 (interrupts).
CPUS=$(lscpu -p=CPU,CORE 2>/dev/null | awk -F, '/^#/ {next} $1 == 0 {core0 = $2; next} $2 != core0 && !seen[$2]++ {print $1}' | head -2 | paste -sd, -)
if [ "$(echo "$CPUS" | tr ',' '\n' | grep -c .)" = 2 ] && command -v taskset >/dev/null 2>&1; then
    step "bench/cpu_scaling.py on CPUs $CPUS" 90 "$OUT/cpu_benches.log" \
        taskset -c "$CPUS" "$PY" bench/cpu_scaling.py --repeats 5 --frames 400
    step "bench/metrics_overhead.py on CPUs $CPUS" 60 "$OUT/cpu_benches.log" \
        taskset -c "$CPUS" "$PY" bench/metrics_overhead.py --repeats 7 --frames 8000
else
    log "CPU benchmarks: SKIPPED (no two physical cores found, or no taskset): '$CPUS'"
fi

# -- 8. results -------------------------------------------------------------------------------------
cp bench/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null && log "bench/RESULTS.md copied"
log "gpu_session: done in $(($(date +%s) - T0)) s; files: $(ls "$OUT" | tr '\n' ' ')"
exit 0
