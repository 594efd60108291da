"""cliptune's benchmarks: overhead, pruning savings and search quality, measured side by side.

Run them all with ``python -m benchmarks``, one with ``python -m benchmarks clip_kernels``; each
prints its table and writes ``benchmarks/results/<name>.json``. ``python -m benchmarks.plot``
turns the JSON into ``docs/benchmarks.md`` and ``docs/search_quality.png``.
"""
