"""The embedding store's write side: tables (:mod:`.tables`), commits that survive broken
connections (:mod:`.commits`), the writers' lease (:mod:`.lease`) and upkeep (:mod:`.maintenance`)."""
