"""Where a checkpoint is: a local folder, or a Hugging Face Hub repository id ("mnaylor/mega-base-wikitext").

An id is fetched with huggingface_hub (an optional dependency, needed only for ids) into the Hub's own cache, one
file at a time, so that a repository holding both model.safetensors and pytorch_model.bin costs one download, and
every fetched file lands in one snapshot folder that `loading.read_weights` then reads like a local folder. The
options are those of transformers' from_pretrained: revision, cache_dir, local_files_only (the cache only, as
HF_HUB_OFFLINE=1), token, force_download, subfolder.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Dict, Tuple

HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "subfolder")
CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
WEIGHTS_NAME = "pytorch_model.bin"
# The weight files in the order loading.read_weights prefers them (safetensors first; each alone or sharded).
WEIGHT_FILES = tuple(name + ext for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME) for ext in ("", ".index.json"))


def split_hub_options(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """kwargs -> (the Hub options in it, the rest)."""
    hub = {k: v for k, v in kwargs.items() if k in HUB_OPTIONS}
    return hub, {k: v for k, v in kwargs.items() if k not in HUB_OPTIONS}


def _looks_like_repo_id(name: str) -> bool:
    """"name" or "owner/name", not a path: no leading '/', '.' or '~', at most one '/', no backslash."""
    return bool(name) and name[0] not in "/.~" and name.count("/") <= 1 and "\\" not in name and not name.endswith("/")


def resolve(name_or_path: str, weights: bool, **hub) -> str:
    """The local folder of a checkpoint, holding config.json and, when `weights`, its weight files.

    A folder that exists is used as it is (with `subfolder` joined); anything else that has the form of a Hub
    id is fetched into the Hub cache. Raises FileNotFoundError for a missing local path, ImportError when an id
    needs huggingface_hub, OSError (naming the id and the files tried) when the Hub or the cache lacks a file."""
    name_or_path = os.fspath(name_or_path)
    unknown = set(hub) - set(HUB_OPTIONS)
    if unknown:
        raise TypeError(f"resolve: unknown option(s) {sorted(unknown)}; the Hub options are {HUB_OPTIONS}")
    subfolder = hub.pop("subfolder", None) or ""
    local = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(local):
        return local
    if os.path.exists(name_or_path) or not _looks_like_repo_id(name_or_path):
        raise FileNotFoundError(f"from_pretrained: {local!r} is not a folder holding {CONFIG_NAME} and the weights; "
                                "pass a folder written by save_pretrained (ours or transformers') or a Hugging Face "
                                "Hub id such as 'owner/name'")
    try:
        from huggingface_hub import constants, errors, hf_hub_download
    except ImportError:
        raise ImportError(f"from_pretrained: {name_or_path!r} is not a local folder; to fetch it as a Hugging Face "
                          "Hub id, pip install huggingface_hub") from None

    def fetch(filename: str) -> str:
        return hf_hub_download(name_or_path, filename, subfolder=subfolder or None, **hub)

    fetch_errors = (errors.HfHubHTTPError, errors.EntryNotFoundError, OSError, ValueError)

    def fail(what: str, err: Exception) -> OSError:
        offline = hub.get("local_files_only") or constants.HF_HUB_OFFLINE
        where = "in the local Hub cache" if offline else "on the Hugging Face Hub"
        revision = hub.get("revision") or "main"
        return OSError(f"from_pretrained: {name_or_path!r} is not a local folder, and {what} was not found {where} "
                       f"(revision {revision!r}{', subfolder ' + repr(subfolder) if subfolder else ''}): "
                       f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    try:
        folder = os.path.dirname(fetch(CONFIG_NAME))
    except fetch_errors as err:
        raise fail(CONFIG_NAME, err) from err
    if not weights:
        return folder
    has_safetensors = importlib.util.find_spec("safetensors") is not None
    names = [n for n in WEIGHT_FILES if has_safetensors or "safetensors" not in n]
    for name in names:
        try:
            path = fetch(name)
        except errors.EntryNotFoundError:
            continue  # not in the repository (or, offline, not in the cache): the next kind
        if name.endswith(".index.json"):
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            for shard in shards:
                try:
                    fetch(shard)
                except fetch_errors as err:
                    raise fail(f"{shard} (a shard listed in {name})", err) from err
        return folder
    raise fail(f"any of {', '.join(names)}", FileNotFoundError("no weight file"))
