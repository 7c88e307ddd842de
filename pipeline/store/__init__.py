"""The embedding store, the only package that imports ``lance``: the one handle on a store root
(:class:`.tables.Store`: tables opened at a pinned version, :class:`.tables.StoreRef` for workers,
data files and commits), commits that survive broken connections (:mod:`.commits`), the writers'
lease (:mod:`.lease`), derived-column writes under it (:mod:`.columns`), versions and tags
(:mod:`.snapshots`) and upkeep (:mod:`.maintenance`)."""
