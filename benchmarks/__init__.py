"""Benchmarks: engine (`python -m benchmarks.engine`), HTTP load (`python -m benchmarks.load`), and the
naive one-forward-per-request baseline server (`benchmarks.naive_server`). Method and numbers:
docs/benchmarks.md."""
