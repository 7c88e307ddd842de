"""Batch embedding pipeline: catalog -> decode/window (CPU) -> MusicFM (GPU) -> Lance store."""
