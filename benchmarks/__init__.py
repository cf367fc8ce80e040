"""manu_fast benchmark suite: `pytest benchmarks/ -q -s` (see docs/BENCHMARKS.md)."""
