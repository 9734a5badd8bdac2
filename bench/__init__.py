"""Benchmarks for kimi-rotator; see bench/README.md. Not collected by pytest."""
