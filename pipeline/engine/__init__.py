"""The model engine: one way to load MusicFM from flags and turn decoded audio into pooled
vectors, shared by the Ray data path (:mod:`pipeline.flow`), query-by-audio in search and the
evaluation harness.

:mod:`.inference` (EmbedSettings, load_model, WindowEmbedder, embed_uri), :mod:`.staging` (GPU
copy/compute overlap), :mod:`.device` (the CPU bf16 rule, batch size from GPU memory, SDPA
kernels), :mod:`.model_info` (:class:`~.model_info.ModelInfo`, what a run knows about its model).
"""
