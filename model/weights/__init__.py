"""Checkpoint readers, key tables and the load_checkpoint entry point."""

from .hub import cached_repos, download_repo, parse_hub_id
from .load import LoadedModel, load_checkpoint, load_strict
from .readers import read_npz, read_safetensors, read_torch, read_weights_file

__all__ = [
    "LoadedModel",
    "cached_repos",
    "download_repo",
    "load_checkpoint",
    "load_strict",
    "parse_hub_id",
    "read_npz",
    "read_safetensors",
    "read_torch",
    "read_weights_file",
]
