"""What the data path reads from a run's settings: :class:`FlowJob`, a typed view that
:class:`pipeline.runs.settings.EmbedJob` satisfies (runs sits above flow, so flow names the fields
it needs instead of importing the job)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from pipeline.io.audio import AudioLimits


@runtime_checkable
class FlowJob(Protocol):
    """The run settings :mod:`pipeline.flow` uses: the model source, the decode limits, the model
    batch and the pool sizes (``None``: sized from the model and the cluster)."""

    @property
    def checkpoint(self) -> str: ...
    @property
    def stats(self) -> str | None: ...
    @property
    def model_config(self) -> str | None: ...
    @property
    def storage_options(self) -> dict[str, Any]: ...
    @property
    def limits(self) -> AudioLimits: ...
    @property
    def decode_timeout_s(self) -> float | None: ...
    @property
    def batch_size(self) -> int | None: ...
    @property
    def gpu_actors(self) -> int | None: ...
    @property
    def gpu_actors_min(self) -> int | None: ...
    @property
    def decode_cpus(self) -> int | None: ...
    @property
    def decode_cpus_min(self) -> int | None: ...
