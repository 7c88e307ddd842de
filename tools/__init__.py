"""Developer tools of the repository, shared by tests/ and bench/ (never imported by the pipeline):
the S3 fault proxy, the decoder fuzz corpus, and :mod:`tools.testkit`."""
