"""Similarity search over a store: the reader (:mod:`.reader`), ANN indexes (:mod:`.index`), the HTTP
service (:mod:`.service`), command-line helpers (:mod:`.cli`) and synthetic stores for benchmarks
(:mod:`.synthetic`)."""
