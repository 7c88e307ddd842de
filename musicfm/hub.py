"""Download and cache the released checkpoints through ``huggingface_hub`` (optional extra).

``huggingface_hub`` gives the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``), offline mode
(``HF_HUB_OFFLINE=1``), mirrors (``HF_ENDPOINT``), tokens and revision pinning. It is imported
only when a download is asked for.
"""

from __future__ import annotations

import hashlib
import os

REPO_ID = "minzwon/MusicFM"
PRESETS = {
    "msd": ("pretrained_msd.pt", "msd_stats.json"),
    "fma": ("pretrained_fma.pt", "fma_stats.json"),
}
# Pinned SHA-256 of the released files, where known. ``None``: not pinned (size/hash unverified).
# Set MUSICFM_SHA256_<NAME> (e.g. MUSICFM_SHA256_MSD) to pin a value without a code change.
PINNED_SHA256: dict[str, str | None] = {"pretrained_msd.pt": None, "pretrained_fma.pt": None}


class HubError(RuntimeError):
    """The checkpoint could not be fetched (offline and not cached, missing extra, bad name, bad hash)."""


def _expected_sha256(name: str, filename: str) -> str | None:
    return os.environ.get(f"MUSICFM_SHA256_{name.upper()}") or PINNED_SHA256.get(filename)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_pretrained(
    name: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    repo_id: str = REPO_ID,
) -> tuple[str, str]:
    """Local paths of (checkpoint, stats) for preset ``name`` ("msd" or "fma"), downloading if needed."""
    if name not in PRESETS:
        raise HubError(f"unknown pretrained model {name!r}; choose from {', '.join(PRESETS)}")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise HubError(
            "downloading MusicFM weights needs huggingface_hub: pip install 'musicfm-pipeline[hub]' "
            "(or pass --checkpoint/--stats paths)"
        ) from None
    ckpt_name, stats_name = PRESETS[name]
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, token=token)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    paths = []
    for filename in (stats_name, ckpt_name):
        try:
            paths.append(hf_hub_download(filename=filename, **kwargs))
        except LocalEntryNotFoundError as e:
            raise HubError(_not_cached_message(f"{repo_id}/{filename}", e)) from None
        except Exception as e:  # hub HTTP errors: 401/404/revision not found, connection errors
            raise HubError(f"cannot fetch {repo_id}/{filename}: {_describe(e)}") from None
    stats_path, ckpt_path = paths
    want = _expected_sha256(name, ckpt_name)
    if want:
        got = sha256_file(ckpt_path)
        if got != want.lower():
            _remove_cached(ckpt_path)
            raise HubError(
                f"{ckpt_name}: SHA-256 mismatch (expected {want}, got {got}); the cached file was deleted"
            )
    return ckpt_path, stats_path


def _describe(e: BaseException) -> str:
    """``Type: message`` on one line (hub errors put the useful part after a blank line; some are empty)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _not_cached_message(what: str, e: BaseException) -> str:
    """huggingface_hub raises LocalEntryNotFoundError both when offline and when the endpoint answered
    with an HTTP error it does not map (e.g. a bare 404 from a wrong HF_ENDPOINT); tell them apart."""
    from huggingface_hub.errors import HfHubHTTPError

    cause = e.__cause__
    if isinstance(cause, HfHubHTTPError):
        return (
            f"cannot fetch {what}: the Hub endpoint answered {_describe(cause)}; the file is not in the "
            f"local Hugging Face cache either. Check HF_ENDPOINT and the repo id, or pass a local path."
        )
    reason = f": {_describe(cause)}" if cause is not None else ""
    return (
        f"{what} is not in the local Hugging Face cache and cannot be downloaded (offline mode or no "
        f"connection{reason}). Download it once while online, or pass a local path."
    )


def _remove_cached(path: str) -> None:
    """Delete a cached snapshot file and the blob it links to."""
    real = os.path.realpath(path)
    for p in {path, real}:
        if os.path.lexists(p):
            os.remove(p)
