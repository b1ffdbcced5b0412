"""Quality tables and performance benchmarks."""
