"""Front ends of the similarity search: command-line helpers (:mod:`pipeline.query.cli`) and the
HTTP service (:mod:`pipeline.query.service`). The search itself is :mod:`pipeline.search`, the
indexes :mod:`pipeline.index`."""
