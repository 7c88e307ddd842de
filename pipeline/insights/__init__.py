"""Beyond search: near-duplicate groups, probes that label the catalog, and a map of the catalog.

Modules: :mod:`.vectors` (reading layer vectors, writing derived columns into ``tracks``),
:mod:`.duplicates`, :mod:`.probes`, :mod:`.predict`, :mod:`.catalog_map`, :mod:`.cli`.
"""
