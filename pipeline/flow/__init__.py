"""The data path on Ray: runtime setup (:mod:`.runtime`), the catalog as a Dataset (:mod:`.catalog_rows`),
the stages (:mod:`.stages`), the model stage's failure policy (:mod:`.guard`) and the one
decode -> model -> writer pass (:mod:`.streaming`). The model itself runs through
:mod:`pipeline.engine`, which the query path shares."""
