"""Benchmark suite of cascade_kernels: ceilings, our kernels and their peers on fixed, named cases.

Run ``python -m benchmarks [suite ...] [--quick] [--out DIR] [--no-record]`` from the repository root;
``benchmarks/run_h200.sh`` is the same with the FlashInfer peer installed first. ``NOTES.md`` holds the
floor of every case and, per kernel, its versions; ``RESULTS.md`` and ``results/`` hold measurements.

Nothing here imports ``cascade_kernels`` at import time: ``__main__`` first decides whether kernels run
under ``TRITON_INTERPRET=1``, which must be set before any ``@triton.jit`` function is defined.
"""
