"""The jobs: settings (:mod:`.settings`), model probe (:mod:`.model_info`), reports (:mod:`.report`),
the embed job (:mod:`.embed`), the refresh plan (:mod:`.plan`) and job (:mod:`.refresh`), Parquet
export (:mod:`.export`) and the offline demo (:mod:`.demo`)."""
