"""Where an SAE source lives: a local path, or a Hugging Face Hub id `org/name` (or `org/name:subfolder`)
fetched with `huggingface_hub.snapshot_download`, from the local cache first."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _is_hub_id(repo_id: str) -> bool:
    """An `org/name` that cannot be a local path: a local path's missing directory is never sent to the Hub.
    `runs/x` is taken as local when a `runs` directory exists here; write ./org/name for a local path."""
    return bool(HUB_ID.fullmatch(repo_id)) and not Path(repo_id).parent.exists()


def local_path(source: str | Path) -> Path:
    """The local directory of `source`: the path itself when it exists, else the cached or downloaded
    snapshot of a Hub id (only the cache when offline: HF_HUB_OFFLINE)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    repo_id, _, subfolder = str(source).partition(":")
    if not _is_hub_id(repo_id):
        raise FileNotFoundError(
            f"{source} does not exist (a Hugging Face Hub id is written org/name or org/name:subfolder)."
        )
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        snapshot = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"{source} is neither a local path nor a cached Hugging Face Hub repository, and the Hub is "
                "offline (HF_HUB_OFFLINE): download it once online or pass a local directory."
            ) from None
        try:
            snapshot = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as err:  # no network, no such repository, no access: each its own kind
            raise FileNotFoundError(
                f"{source} is neither a local path nor a cached Hugging Face Hub repository, and the Hub "
                f"could not provide it ({type(err).__name__}): check the id and the network, or pass a "
                "local directory."
            ) from None
    path = Path(snapshot) / subfolder
    if not path.is_dir():
        raise FileNotFoundError(f"The Hugging Face Hub repository {repo_id} has no folder {subfolder!r}.")
    return path
