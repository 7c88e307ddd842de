"""Helpers shared by the tests and the benchmarks: a real S3 API (moto server) with its client,
buckets and storage options in both accepted styles."""
