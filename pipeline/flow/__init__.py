"""The data path on Ray: runtime setup (:mod:`.runtime`), the stages (:mod:`.stages`), the model side
(:mod:`.inference`) and the one decode -> model -> writer pass (:mod:`.streaming`)."""
