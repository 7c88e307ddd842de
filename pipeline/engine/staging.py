"""Host <-> device traffic of the model stage.

* :class:`Stager`: stacks a batch of windows straight into (pinned, on CUDA) host memory and
  copies it to the device on a side CUDA stream, so the copy of batch n+1 runs while batch n
  computes; the compute stream waits on the copy's event only when it needs the batch.
* :func:`pool_batch` + :class:`Readback`: all pooled layers (and frames) of a batch in one
  tensor, copied to the host once per batch (non-blocking into pinned memory on CUDA), read
  after the next batch has been queued.

On CPU the same calls do no streams and no copies: a batch is the stacked array itself and the
pooled tensor is read in place, so CPU numbers are those of the plain path bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["Readback", "Staged", "Stager", "pool_batch"]


@dataclass
class Staged:
    """A batch on its way to the device: ``tensor`` (B, N) and the copy's event (CUDA only)."""

    tensor: torch.Tensor
    ready: torch.cuda.Event | None = None


class Stager:
    """Moves (B, N) float32 batches to ``device``, overlapping the copy with compute on CUDA."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def host_batch(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack equal-length 1-D arrays into a (B, N) float32 host tensor (pinned on CUDA)."""
        import torch

        n = int(arrays[0].shape[0])
        t = torch.empty((len(arrays), n), dtype=torch.float32, pin_memory=self.cuda)  # (B, N)
        np.stack([np.asarray(a, dtype=np.float32) for a in arrays], out=t.numpy())
        return t

    def to_device(self, host: torch.Tensor) -> Staged:
        """Start the copy of ``host`` (B, N) to the device; returns at once on CUDA."""
        import torch

        if not self.cuda:
            return Staged(host.to(self.device))
        with torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)  # (B, N) on the device
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return Staged(dev, ev)

    def acquire(self, staged: Staged) -> torch.Tensor:
        """The staged tensor, usable on the current stream (which waits for the copy)."""
        import torch

        if staged.ready is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(staged.ready)
            staged.tensor.record_stream(cur)  # the allocator may not reuse it before compute ends
        return staged.tensor


def pool_batch(hs: Sequence[torch.Tensor], n_frames: int | None) -> torch.Tensor:
    """Mean over tokens of each hidden state, stacked: (L, B, D); with ``n_frames``, the mean
    then the frames of each layer: (L, B, 1 + n_frames, D). One tensor, so one device-to-host copy.
    """
    import torch

    from musicfm import frame_pool

    means = torch.stack([h.mean(dim=1) for h in hs])  # (L, B, D)
    if n_frames is None:
        return means
    frames = torch.stack([frame_pool(h, n_frames) for h in hs])  # (L, B, nf, D)
    return torch.cat((means.unsqueeze(2), frames), dim=2)  # (L, B, 1 + nf, D)


class Readback:
    """One device-to-host copy of a pooled batch; :meth:`result` waits for it (CUDA) and returns
    a NumPy array that owns its memory (pinned buffers are not handed downstream)."""

    def __init__(self, pooled: torch.Tensor) -> None:
        import torch

        self.done: torch.cuda.Event | None = None
        if pooled.device.type == "cuda":
            self.host = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
            self.host.copy_(pooled, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = pooled.cpu()

    def result(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
            return self.host.numpy().copy()
        return self.host.numpy()
