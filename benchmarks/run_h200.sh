#!/usr/bin/env bash
# The benchmark run on an H200, from the repository root: install the FlashInfer bundle from .peers/
# (the package unpacked from its tarball plus its apache_tvm_ffi wheel; without it, run without FlashInfer), then
#   python3 -m benchmarks "$@" --out "${OUT:-/tmp/bench_out}"
# Everything the run writes lands under that folder: bench.log, results.json, RESULTS_fragment.md, plots.
set -u
export PYTHONUNBUFFERED=1
# A module variant missing from the bundle would make FlashInfer build it with nvcc for minutes: make
# that peer fail at once instead (reported, not timed). Set FLASHINFER_DISABLE_JIT= to allow building.
export FLASHINFER_DISABLE_JIT="${FLASHINFER_DISABLE_JIT-1}"
BUNDLE=.peers/flashinfer-0.7.2.post1-aot-sm90a.tar.xz
if [ -f "$BUNDLE" ]; then
  export FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_CUDA_ARCH_LIST=9.0a
  if mkdir -p /tmp/site && tar -xJf "$BUNDLE" -C /tmp/site \
      && python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/apache_tvm_ffi-*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "FlashInfer bundle installed under /tmp/site"
  else
    echo "FlashInfer bundle failed to install: running without FlashInfer"
  fi
else
  echo "no $BUNDLE: running without FlashInfer"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv 2>/dev/null || true
exec python3 -m benchmarks "$@" --out "${OUT:-/tmp/bench_out}"
