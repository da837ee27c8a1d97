#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one call: build fastdino._C with its CUDA kernels, run the
# whole test suite on the GPU, every CUDA C++ and Triton kernel under compute-sanitizer, the kernel
# benchmarks, the backbone and segmentation-head benchmarks and the demo, and write the results to
# OUT_DIR:
#   build.log info.txt tests.log sanitizer.log benchmarks.json benchmarks.md backbone.json backbone.md
#   segmentation.json segmentation.md demo.txt
# Usage: scripts/gpu_run.sh OUT_DIR   (needs torch with CUDA, nvcc, compute-sanitizer, pytest,
#   pytest-benchmark, hypothesis, transformers, scipy)
#   STAGES=build,tests,sanitizer,kernels,backbone,segmentation,demo (default: all) runs a subset, e.g.
#   to split the work; SANITIZER_TOOLS (default memcheck,racecheck,initcheck,synccheck) chooses the
#   compute-sanitizer tools; BACKBONE_ARGS and SEGMENTATION_ARGS override the arguments of
#   benchmarks/bench_backbone.py and benchmarks/bench_segmentation.py.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=",${STAGES:-build,tests,sanitizer,kernels,backbone,segmentation,demo},"
SANITIZER_TOOLS=${SANITIZER_TOOLS:-memcheck,racecheck,initcheck,synccheck}
BACKBONE_ARGS=${BACKBONE_ARGS:---models vits16,vitb16,vitl16 --resolutions 512,1024 --batches 1,32 --limit max-autotune:vitl16:512:32}
SEGMENTATION_ARGS=${SEGMENTATION_ARGS:-}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-8}
export FASTDINO_COMMIT=${FASTDINO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1
status=0
if [[ $STAGES == *,build,* ]]; then
  echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  FASTDINO_BUILD_CUDA=1 FASTDINO_PTXAS_VERBOSE=1 $PY -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1 \
    || { echo "build failed, see build.log"; tail -30 "$OUT/build.log"; exit 1; }
  grep -E "spill (stores|loads)" "$OUT/build.log" | grep -vE " 0 bytes spill stores, 0 bytes spill loads" && echo "WARNING: CUDA kernels spill"
  (cd /tmp && $PY -m fastdino info) | tee "$OUT/info.txt"
fi
if [[ $STAGES == *,tests,* ]]; then
  echo "== tests"
  $PY -m pytest -p no:cacheprovider -q -rs tests >"$OUT/tests.log" 2>&1 || status=1
  tail -5 "$OUT/tests.log"
fi
if [[ $STAGES == *,sanitizer,* ]]; then
  # scripts/sanitize.py runs each op pinned to each kernel backend at small odd shapes, every dtype
  # and input form. Without the caching allocator every tensor is its own allocation, so memcheck
  # sees a read past a tensor's end rather than into a neighbour in the same cached block.
  SANITIZER=${COMPUTE_SANITIZER:-$CUDA_HOME/bin/compute-sanitizer}
  : >"$OUT/sanitizer.log"
  for tool in ${SANITIZER_TOOLS//,/ }; do
    echo "== compute-sanitizer --tool $tool" | tee -a "$OUT/sanitizer.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 50 \
      $PY scripts/sanitize.py >"$OUT/sanitizer.tmp" 2>&1 || status=1
    grep -E "SUMMARY|^FAIL" "$OUT/sanitizer.tmp"
    cat "$OUT/sanitizer.tmp" >>"$OUT/sanitizer.log"
  done
  rm -f "$OUT/sanitizer.tmp"
fi
if [[ $STAGES == *,kernels,* ]]; then
  echo "== kernel benchmarks"
  $PY -m pytest -p no:cacheprovider -q benchmarks --benchmark-enable --benchmark-json="$OUT/benchmarks.json" \
    --benchmark-columns=median,iqr,rounds >"$OUT/bench.log" 2>&1 || { status=1; tail -20 "$OUT/bench.log"; }
  $PY benchmarks/summarize.py "$OUT/benchmarks.json" | tee "$OUT/benchmarks.md"
  cat "$OUT/bench.log" >>"$OUT/tests.log"
  rm -f "$OUT/bench.log"
fi
if [[ $STAGES == *,backbone,* ]]; then
  echo "== backbone benchmark ($BACKBONE_ARGS)"
  # shellcheck disable=SC2086
  $PY benchmarks/bench_backbone.py $BACKBONE_ARGS --json "$OUT/backbone.json" >"$OUT/backbone.log" 2>&1 || status=1
  sed -n '/^| model/,$p' "$OUT/backbone.log" | tee "$OUT/backbone.md"
  [ -s "$OUT/backbone.md" ] || tail -20 "$OUT/backbone.log"
fi
if [[ $STAGES == *,segmentation,* ]]; then
  echo "== segmentation benchmark ($SEGMENTATION_ARGS)"
  # shellcheck disable=SC2086
  $PY benchmarks/bench_segmentation.py $SEGMENTATION_ARGS --json "$OUT/segmentation.json" >"$OUT/segmentation.log" 2>&1 \
    || status=1
  sed -n '/^| model/,$p' "$OUT/segmentation.log" | tee "$OUT/segmentation.md"
  [ -s "$OUT/segmentation.md" ] || tail -20 "$OUT/segmentation.log"
fi
if [[ $STAGES == *,demo,* ]]; then
  echo "== demo"
  (cd /tmp && $PY -m fastdino demo) 2>&1 | tee "$OUT/demo.txt" || status=1
fi
exit $status
