"""Resolving a recipe's model sources (hub ids or local folders) with errors a user can act on."""

from __future__ import annotations

import os
from pathlib import Path

from lvit.errors import LvitError


def resolve_source(value: str, key: str, source: str) -> str:
    """Return a loadable source for recipe key `key`: a local folder, or a hub id that is reachable.

    A hub id is checked by fetching its small `config.json` (from the local cache when present),
    so an offline machine or a typo fails here, in a second, with a message naming the recipe key,
    instead of deep inside `from_pretrained`.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LvitError(f"{source}: {key} = {value!r} is a folder without config.json; point it at a "
                            "Hugging Face model folder (one written by save_pretrained).")
        return str(path)
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise LvitError(f"{source}: {key} = {value!r}: no such folder.")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        hf_hub_download(value, "config.json")
    except (OSError, ValueError, HfHubHTTPError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else (
            f"it could not be fetched from the Hugging Face Hub ({type(exc).__name__})")
        raise LvitError(
            f"{source}: {key} = {value!r}: {why}.\n"
            f"Fix: download it on a machine with network access (`hf download {value}`) so it is in the "
            f"cache, or set {key} to a local folder, e.g. `lvit finetune RECIPE {key}=/path/to/model`. "
            "Check the id for typos."
        ) from None
    return value
