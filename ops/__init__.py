"""Operations: the benchmarks (`python -m ops.bench`, `python -m ops.soak`) and their harness."""
