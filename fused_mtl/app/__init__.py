"""What is built on the public API: the ``fused-mtl`` command (``cli``), the demo's experiment
(``demo``) and its plots (``plots``, matplotlib), and the benchmark cases and reports
(``benchmark_cases``, ``benchmark_report``) that ``fused-mtl bench`` and ``pytest benchmarks/``
share. Nothing in the core imports from here."""
