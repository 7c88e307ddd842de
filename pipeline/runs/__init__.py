"""The jobs: settings (:mod:`.settings`), model probe (:mod:`.model_info`), reports (:mod:`.report`),
the embed job (:mod:`.embed`), the refresh plan (:mod:`.plan` on the driver, :mod:`.ray_plan` on Ray)
and job (:mod:`.refresh`), Parquet export (:mod:`.export`), the jobs' command lines
(:mod:`.commands`) and the offline demo (:mod:`.demo`)."""
