"""omniad-bench: reproducible Omni-AD benchmarking."""
