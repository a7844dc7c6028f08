"""Issue-11 performance benchmarks: ``python -m benchmarks`` (see run.py and README.md)."""
