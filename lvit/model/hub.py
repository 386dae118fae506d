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
            raise LvitError(
                f"{source}: {key} = {value!r} is a folder without config.json; point it at a "
                "Hugging Face model folder (one written by save_pretrained)."
            )
        return str(path)
    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise LvitError(f"{source}: {key} = {value!r}: no such folder.")

    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return value  # in the local cache: loads offline
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off"):
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    else:
        # One request, no retries: an offline machine answers in about a second instead of the
        # minute of back-off that a download would spend.
        try:
            HfApi().model_info(value, timeout=10)
            return value
        except RepositoryNotFoundError:
            why = "no such model on the Hugging Face Hub (or it is private and you are not logged in)"
        except Exception as exc:  # network errors come in many types; all mean the same here
            why = f"the Hugging Face Hub cannot be reached ({type(exc).__name__}) and it is not in the local cache"
    raise LvitError(
        f"{source}: {key} = {value!r}: {why}.\n"
        f"Fix: download it where there is network access (`hf download {value}`) so it is in the cache, "
        f"or set {key} to a local folder: `lvit finetune RECIPE {key}=/path/to/model`. Check the id for typos."
    )
