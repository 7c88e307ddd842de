"""The data path on Ray: runtime setup (:mod:`.runtime`), the catalog as a Dataset (:mod:`.catalog_rows`),
the stages (:mod:`.stages`), the model side (:mod:`.inference`, :mod:`.staging`, :mod:`.device`) and
the one decode -> model -> writer pass (:mod:`.streaming`)."""
