"""What the tests and the benchmarks both need: the repository's paths and the shared data folder
(:mod:`.paths`), a real S3 API (:mod:`.s3`, :mod:`.net`), stores and jobs with the small golden model
(:mod:`.stores`), synthetic audio, store checks, fault injection and memory samplers
(:mod:`.reliability`, :mod:`.memory`). Import it with the repository root on ``sys.path``."""
