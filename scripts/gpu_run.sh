#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one call: build fastdino._C with its CUDA kernels, test every
# op on the device, tune the headline models (fastdino tune: the timing cache users on the same GPU
# can start from), time each op's kernels against their baselines, and run `fastdino bench` on the
# whole segmentation models; write the results to OUT_DIR.
#
# Usage: scripts/gpu_run.sh OUT_DIR   (needs torch with CUDA, nvcc, pytest, pytest-benchmark,
#   hypothesis, transformers, scipy, rich, matplotlib; pytest-xdist where installed)
#
# The default profile (STAGES=build,cuda-tests,tune,dispatch,kernels,bench) is sized to finish in 8 minutes
# on an H200, build included, each stage under a time limit so that a slow one cannot starve the next:
#   build       MAX_JOBS=16 parallel nvcc jobs (about 1.5 min)
#   cuda-tests  every op's tests on the device, in parallel with pytest-xdist, no compile-heavy
#               tests (CUDA_TESTS_TIMEOUT, default 90 s)
#   tune        fastdino tune, bf16: ViT-S/16 and ViT-L/16 at 512^2, batch 1 and 32; then the
#               Mask2Former segmentor (precision bf16), ConvNeXt-T + linear and EoMT-S at batch 1;
#               every decision's candidates and winner in the tune log, the cache in
#               OUT_DIR/timing-cache.json (TUNE_TIMEOUT, default 80 s)
#   dispatch    host us per launch on tiny problems: each op's C++ kernel and Triton launch function
#               called directly, and through fastdino's dispatch (benchmarks/bench_dispatch.py
#               --device cuda; DISPATCH_TIMEOUT, default 30 s)
#   kernels     every op's providers at two representative shapes, do_bench medians, no
#               torch.compile providers (FASTDINO_BENCH_QUICK=1; KERNELS_TIMEOUT, default 75 s)
#   bench       fastdino bench at 512^2, batch 1: the ViT-S/16 + adapter + Mask2Former segmentor
#               (dinov3's own, hidden 384, when DINOV3_REPO points to a checkout that imports,
#               else transformers' Mask2Former on a DINOv3 ViT-S/16), ConvNeXt-T + linear head,
#               EoMT-DINOv3-S; variants original, original-bf16, fastdino-bf16 (untuned),
#               fastdino-bf16-tuned, fastdino-bf16-tuned+graph (CUDA-graph replay), the eager ones
#               timed in interleaved rounds (BENCH_TIMEOUT, default 140 s)
# Other stages, selected with STAGES: tests (the whole suite), sanitizer (every kernel under
# compute-sanitizer; SANITIZER_TOOLS), kernels-full (every shape and provider), bench-large
# (ViT-L/16 models, EoMT-L at 640^2, ConvNeXt-T/S/B/L, batch 32, compile and max-autotune of the
# original and of fastdino-bf16), deploy (tests/test_export.py and test_compile.py on the device,
# `fastdino export` of ViT-S/16 as an AOTInductor package, loaded and run),
# backbone and segmentation (benchmarks/bench_backbone.py, bench_segmentation.py; BACKBONE_ARGS,
# SEGMENTATION_ARGS), demo. BENCH_ARGS replaces the bench stage's arguments.
#
# OUT_DIR gets at most 8 files: summary.md (versions, stage status and times, the tables, the tune
# results), bench.json, bench.md, bench.png, kernels.json, timing-cache.json, tests.log and
# logs.tar.gz (build log, fastdino info, kernels.md, tune.log, and the logs of any other stage).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=",${STAGES:-build,cuda-tests,tune,dispatch,kernels,bench},"
SANITIZER_TOOLS=${SANITIZER_TOOLS:-memcheck,racecheck,initcheck,synccheck}
CUDA_TESTS_TIMEOUT=${CUDA_TESTS_TIMEOUT:-90}
TUNE_TIMEOUT=${TUNE_TIMEOUT:-80}
DISPATCH_TIMEOUT=${DISPATCH_TIMEOUT:-30}
KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-75}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-140}
BACKBONE_ARGS=${BACKBONE_ARGS:---models vits16,vitb16,vitl16 --resolutions 512,1024 --batches 1,32 --limit max-autotune:vitl16:512:32}
SEGMENTATION_ARGS=${SEGMENTATION_ARGS:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export FASTDINO_COMMIT=${FASTDINO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1
export LOGS=$OUT/logs OUT PY
mkdir -p "$LOGS"
status=0
SUMMARY=$OUT/summary.md
echo "# GPU run, commit $FASTDINO_COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$SUMMARY"

# stage NAME SECONDS COMMAND...: run with a time limit (0: none), log its status and wall time.
stage() {
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name"
  start=$(date +%s)
  # through bash -c: timeout cannot run a shell function itself (they are exported below)
  if [ "$limit" -gt 0 ]; then timeout --signal=INT --kill-after=10 "$limit" bash -c '"$@"' _ "$@"; else "$@"; fi
  rc=$?
  [ $rc -eq 0 ] || status=1
  local note=""
  [ $rc -eq 124 ] && note=" (stopped at its ${limit} s limit)"
  echo "- $name: exit $rc in $(( $(date +%s) - start )) s$note" | tee -a "$SUMMARY"
  return $rc
}

if [[ $STAGES == *,build,* ]]; then
  build() {
    FASTDINO_BUILD_CUDA=1 FASTDINO_PTXAS_VERBOSE=1 $PY -m pip install --no-build-isolation --no-deps -v . \
      >"$LOGS/build.log" 2>&1 || { tail -30 "$LOGS/build.log"; return 1; }
    grep -E "spill (stores|loads)" "$LOGS/build.log" | grep -vE " 0 bytes spill stores, 0 bytes spill loads" \
      && echo "WARNING: CUDA kernels spill"
    (cd /tmp && $PY -m fastdino info) >"$LOGS/info.txt" 2>&1
    return 0
  }
  stage build 0 build || { tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs; rm -rf "$LOGS"; exit 1; }
fi

if [[ $STAGES == *,cuda-tests,* ]]; then
  # The op tests run on the device when a GPU is visible; the sm_90 compile and Inductor tests
  # (marked slow) are CPU-side checks that CI already runs.
  tests=$($PY -c "from fastdino.ops import OPS; print(' '.join(f'tests/test_{n}.py' for n in OPS))")
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  # shellcheck disable=SC2086
  stage cuda-tests "$CUDA_TESTS_TIMEOUT" $PY -m pytest -p no:cacheprovider -q -rs -m "not slow" $xdist $tests \
    tests/test_nan_inf.py >"$OUT/tests.log" 2>&1
  tail -3 "$OUT/tests.log"
fi

# dinov3's segmentor where its checkout imports here (its requirements installed), else transformers'
segmentor=m2f-vits16
repo=()
if [ -n "${DINOV3_REPO:-}" ] && (cd /tmp && $PY -c "import sys; sys.path.insert(0, sys.argv[1]); \
    import dinov3.eval.segmentation.models" "$DINOV3_REPO") >>"$LOGS/segmentor.log" 2>&1; then
  segmentor=official-m2f-vits16-h384
  repo=(--dinov3-repo "$DINOV3_REPO")
fi
export SEGMENTOR=$segmentor DINOV3_ARGS="${repo[*]}"

if [[ $STAGES == *,tune,* ]]; then
  tune() {
    local cache=(--cache "$OUT/timing-cache.json")
    # shellcheck disable=SC2086
    (cd /tmp && $PY -m fastdino tune vits16,vitl16 --resolution 512 --batch 1 "${cache[@]}" \
      && $PY -m fastdino tune vits16,vitl16 --resolution 512 --batch 32 "${cache[@]}" \
      && $PY -m fastdino tune "$SEGMENTOR" $DINOV3_ARGS --precision bf16 --resolution 512 "${cache[@]}" \
      && $PY -m fastdino tune convnext-t+linear,eomt-s --resolution 512 "${cache[@]}" --explain) \
      >"$LOGS/tune.log" 2>&1
  }
  export -f tune
  stage tune "$TUNE_TIMEOUT" tune
fi

if [[ $STAGES == *,dispatch,* ]]; then
  # host microseconds per launch of tiny problems: the C++ op and the Triton launch function called
  # directly, against the same launches through fastdino's dispatch (one row per op as it is done)
  dispatch() {
    $PY benchmarks/bench_dispatch.py --device cuda --number 1000 >"$LOGS/dispatch.md" 2>"$LOGS/dispatch.log"
  }
  export -f dispatch
  stage dispatch "$DISPATCH_TIMEOUT" dispatch
fi

if [[ $STAGES == *,tests,* ]]; then
  stage tests 0 $PY -m pytest -p no:cacheprovider -q -rs tests >>"$OUT/tests.log" 2>&1
  tail -3 "$OUT/tests.log"
fi

if [[ $STAGES == *,sanitizer,* ]]; then
  # Without the caching allocator every tensor is its own allocation, so memcheck sees a read
  # past a tensor's end rather than into a neighbour in the same cached block.
  SANITIZER=${COMPUTE_SANITIZER:-$CUDA_HOME/bin/compute-sanitizer}
  for tool in ${SANITIZER_TOOLS//,/ }; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage "sanitizer-$tool" 0 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      --print-limit 50 $PY scripts/sanitize.py >>"$LOGS/sanitizer.log" 2>&1
  done
fi

kernels() {
  $PY -m pytest -p no:cacheprovider -q benchmarks --ignore=benchmarks/bench_dispatch.py --benchmark-enable \
    --benchmark-json="$OUT/kernels.json" --benchmark-columns=median,iqr,rounds >"$LOGS/kernels.log" 2>&1
  local rc=$?
  $PY benchmarks/summarize.py "$OUT/kernels.json" >"$LOGS/kernels.md" 2>>"$LOGS/kernels.log"
  return $rc
}
export -f kernels
if [[ $STAGES == *,kernels,* ]]; then
  FASTDINO_BENCH_QUICK=1 stage kernels "$KERNELS_TIMEOUT" kernels
fi
if [[ $STAGES == *,kernels-full,* ]]; then
  stage kernels-full 0 kernels
fi

bench() {
  # shellcheck disable=SC2086
  (cd /tmp && $PY -m fastdino bench --no-progress "$@" --json "$OUT/bench.json" --png "$OUT/bench.png" \
    --md "$OUT/bench.md") >"$LOGS/bench.log" 2>&1
}
export -f bench
if [[ $STAGES == *,bench,* ]]; then
  if [ -n "${BENCH_ARGS:-}" ]; then
    # shellcheck disable=SC2086
    stage bench "$BENCH_TIMEOUT" bench $BENCH_ARGS
  else
    stage bench "$BENCH_TIMEOUT" bench --models "$segmentor,convnext-t+linear,eomt-s" "${repo[@]}" \
      --resolution 512 --batch 1 \
      --variants original,original-bf16,fastdino-bf16,fastdino-bf16-tuned,fastdino-bf16-tuned+graph
  fi
fi
if [[ $STAGES == *,bench-large,* ]]; then
  large() {
    local repo=()
    [ -n "${DINOV3_REPO:-}" ] && repo=(--dinov3-repo "$DINOV3_REPO")
    local models=m2f-vitl16,convnext-t+linear,convnext-s+linear,convnext-b+linear,convnext-l+linear
    [ -n "${DINOV3_REPO:-}" ] && models=$models,official-m2f-vits16-h32,official-m2f-vitl16-h384
    (cd /tmp && $PY -m fastdino bench --no-progress --models "$models" "${repo[@]}" --resolution 512 \
      --batch 32 --variants original,original-bf16,compile,max-autotune,fastdino,fastdino-bf16,fastdino-bf16+max-autotune \
      --json "$LOGS/bench-large.json" --md "$LOGS/bench-large.md" \
      && $PY -m fastdino bench --no-progress --models eomt-l --resolution 640 \
      --variants original,original-bf16,compile,max-autotune,fastdino-bf16,fastdino-bf16+graph,fastdino-bf16+max-autotune \
      --json "$LOGS/bench-eomt-l.json" --md "$LOGS/bench-eomt-l.md") >"$LOGS/bench-large.log" 2>&1
  }
  export -f large
  stage bench-large 0 large
fi

if [[ $STAGES == *,deploy,* ]]; then
  # export, AOTInductor (a fresh process loads the package) and fullgraph compile of every family on
  # the device, pinned to the CUDA kernels; then `fastdino export` of ViT-S/16 at 512^2 in bf16
  deploy() {
    { $PY -m pytest -p no:cacheprovider -q -rs tests/test_export.py tests/test_compile.py \
      && (cd /tmp && $PY -m fastdino export vits16 --out "$LOGS/vits16.pt2" --resolution 512 --device cuda \
        --dtype bfloat16 && $PY -c "import sys, torch, fastdino
r = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.randn(4, 3, 512, 512, device='cuda', dtype=torch.bfloat16)
print('vits16.pt2 ran:', [tuple(t.shape) for t in r(x)], r.get_metadata().get('fastdino.outputs'))" "$LOGS/vits16.pt2" \
        && rm -f "$LOGS/vits16.pt2"); } >"$LOGS/deploy.log" 2>&1
  }
  export -f deploy
  stage deploy 0 deploy
fi
if [[ $STAGES == *,backbone,* ]]; then
  # shellcheck disable=SC2086
  stage backbone 0 $PY benchmarks/bench_backbone.py $BACKBONE_ARGS --json "$LOGS/backbone.json" >"$LOGS/backbone.log" 2>&1
fi
if [[ $STAGES == *,segmentation,* ]]; then
  # shellcheck disable=SC2086
  stage segmentation 0 $PY benchmarks/bench_segmentation.py $SEGMENTATION_ARGS --json "$LOGS/segmentation.json" \
    >"$LOGS/segmentation.log" 2>&1
fi
if [[ $STAGES == *,demo,* ]]; then
  stage demo 0 bash -c "cd /tmp && $PY -m fastdino demo" >"$LOGS/demo.txt" 2>&1
fi

{
  echo
  [ -f "$LOGS/info.txt" ] && { echo '```'; cat "$LOGS/info.txt"; echo '```'; }
  [ -f "$OUT/bench.md" ] && { echo; echo "## fastdino bench"; cat "$OUT/bench.md"; }
  [ -f "$LOGS/tune.log" ] && { echo; echo "## fastdino tune"; echo '```'; grep -vE "^  (applies|ignored) " \
    "$LOGS/tune.log" | head -120; echo '```'; }
  [ -s "$LOGS/dispatch.md" ] && { echo; echo "## dispatch (host us per call)"; cat "$LOGS/dispatch.md"; }
  [ -f "$LOGS/kernels.md" ] && { echo; echo "## kernels"; cat "$LOGS/kernels.md"; }
  [ -f "$OUT/tests.log" ] && { echo; echo "## tests"; echo '```'; tail -40 "$OUT/tests.log"; echo '```'; }
} >>"$SUMMARY"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
cat "$SUMMARY" | head -20
exit $status
