"""Peers: what our kernels are measured against (``torch_peers``: PyTorch; ``flashinfer_peers``: FlashInfer).

Each factory takes one case's data and returns a ``runner.Impl``, or raises ``runner.Unavailable``
when it cannot run here (not installed, no CUDA, a layout it does not take).
"""
