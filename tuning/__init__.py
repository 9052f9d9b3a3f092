"""Tuning of the attention kernels' launch configs: ``python -m tuning --help``; see ``tuning/README.md``.

``space`` lists the buckets and candidate configs, ``measure`` builds inputs, times a candidate and
checks it against the float64 reference, ``search`` runs the loop and writes the files that
``cascade_kernels.configs`` loads. Nothing here is imported by the package: tuning never runs on the
serving path.
"""
