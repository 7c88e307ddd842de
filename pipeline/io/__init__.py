"""Reading the world: URIs and their policy (:mod:`.uris`), object access and storage options
(:mod:`.objects`), catalog readers (:mod:`.catalog`), audio decoding (:mod:`.audio`) and windows
(:mod:`.windows`)."""
