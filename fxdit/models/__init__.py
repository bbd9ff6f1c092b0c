"""Reference models for tests, benchmarks and the demo."""
