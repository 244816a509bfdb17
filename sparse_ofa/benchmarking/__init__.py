"""Benchmark building blocks shared by bench/ (pytest-benchmark) and `sparse-ofa bench`: the timed
models and implementations (`e2e`), and speedup tables from benchmark rows (`report`)."""
