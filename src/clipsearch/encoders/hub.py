"""Finding model weights: the Hugging Face hub cache first, a download only when it can work.

huggingface_hub retries an unreachable host for about 50 seconds before giving up; we check
reachability once (a few seconds at most) so that a machine without network gets the
missing-weights message at once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from ..errors import MissingWeightsError, option

CONNECT_TIMEOUT_S = 3.0


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def unreachable_reason(url: str) -> str | None:
    """None if ``url``'s host accepts a TCP connection, else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"bad URL {url!r}"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as e:
        return f"{host} is unreachable ({e.strerror or e})"


def hub_file(repo_id: str, filenames: list[str], cache_dir: str | None = None) -> str | None:
    """Path of the first of ``filenames`` in ``repo_id`` that the local hub cache holds."""
    from huggingface_hub import hf_hub_download

    for name in filenames:
        try:
            return hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # LocalEntryNotFoundError and friends: simply not cached
            continue
    return None


def hub_snapshot(repo_id: str, allow_patterns: list[str], cache_dir: str | None = None) -> Path | None:
    """Folder of a cached snapshot of ``repo_id`` (only the allowed files), or None."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=allow_patterns, cache_dir=cache_dir, local_files_only=True)
    except Exception:
        return None
    return Path(folder)


def fetch_or_explain(
    what: str,
    looked_in: str,
    url: str,
    download: Callable[[], str | Path],
) -> str | Path:
    """Run ``download`` if ``url`` is reachable; otherwise raise the one-line missing-weights error."""
    reason = unreachable_reason(url)
    if reason is None:
        try:
            return download()
        except Exception as e:  # any download failure ends in the same advice
            reason = f"the download failed: {str(e).splitlines()[0][:200]}"
    raise MissingWeightsError(
        f"weights for {what} are not in {looked_in} and cannot be downloaded ({reason}). "
        f"Provide them with {option('weights')} PATH (a checkpoint file or a saved model folder), "
        "or run once with network access to fill the cache."
    )


def snapshot_or_fetch(repo_id: str, allow_patterns: list[str], required: str, what: str) -> Path:
    """Folder of ``repo_id`` from the hub cache, downloaded if needed and possible.

    ``required`` names the file that proves the snapshot is usable (e.g. ``config.json``).
    """
    folder = hub_snapshot(repo_id, allow_patterns)
    if folder is not None and (folder / required).is_file():
        return folder

    def download() -> str:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=allow_patterns)

    where = f"the Hugging Face cache ({hub_cache_dir()}/models--{repo_id.replace('/', '--')})"
    return Path(fetch_or_explain(what, where, hub_endpoint(), download))
