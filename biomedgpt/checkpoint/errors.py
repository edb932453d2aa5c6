"""The checkpoint tools' errors, in a module of their own so that their command lines can name them without
importing torch and transformers (``--help`` stays instant)."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "CheckpointImportError", "ConsolidationError", "VerificationError"]

# Largest safetensors file a consolidation writes unless told otherwise (transformers' own default is 5GB; 2GB keeps
# every shard under the 2 GiB limit of some object stores and file systems).
DEFAULT_MAX_SHARD_SIZE = "2GB"


class ConsolidationError(ValueError):
    """A problem with the checkpoint or the arguments that the user can fix; the message names the file."""


class VerificationError(ConsolidationError):
    """``verify_consolidated`` found the written model differs from the reference."""


class CheckpointImportError(ValueError):
    """The checkpoint cannot be imported as asked; the message says why and what to change."""
