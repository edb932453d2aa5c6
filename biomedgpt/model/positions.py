"""Relative-position buckets and position ids.

The originals: make_token_bucket_position, make_image_bucket_position and the position ids of TransformerEncoder /
TransformerDecoder in BiomedGPT models/ofa/unify_transformer.py.

The bucket tables are not learned; they are rebuilt on the CPU (never on the meta device) and cached, so
every encoder and decoder of a process shares one copy.
"""

from __future__ import annotations

import functools

import torch


def _on_cpu(builder):  # noqa: ANN001, ANN202
    """Build on the CPU even inside a ``torch.device('meta')`` context (buckets are data, not shapes)."""

    @functools.wraps(builder)
    def build(*args):  # noqa: ANN002, ANN202
        with torch.device("cpu"):
            return builder(*args)

    return functools.lru_cache(maxsize=4)(build)


@_on_cpu
def text_relative_buckets(bucket_size: int, max_position: int) -> torch.Tensor:
    """[max_position, max_position] int64: bucket of (query i, key j), in [0, 2*bucket_size-2].

    Distances below bucket_size/2 keep their own bucket; larger ones share log-spaced buckets. The float32
    arithmetic mirrors the original so that released relative-position tables line up exactly.
    """
    positions = torch.arange(max_position, device="cpu")
    relative = positions[:, None] - positions[None, :]
    sign = torch.sign(relative)
    mid = bucket_size // 2
    near = (relative < mid) & (relative > -mid)
    magnitude = torch.where(near, torch.full_like(relative, mid - 1), relative.abs())
    log_ratio = torch.log(magnitude / mid) / torch.log(torch.tensor((max_position - 1) / mid))
    log_bucket = (torch.ceil(log_ratio * (mid - 1)) + mid).int()
    bucket = torch.where(magnitude.le(mid), relative, log_bucket * sign).long()
    return bucket + bucket_size - 1


@_on_cpu
def image_relative_buckets(grid_size: int) -> torch.Tensor:
    """[G*G+1, G*G+1] int64 indexed by image position ids (row*G + col + 1; id 0 reserved).

    Entry [p, q] for two patches is (drow + G-1) * (2G-1) + (dcol + G-1); row 0 / column 0 / [0,0] hold the
    three extra buckets R-3 / R-2 / R-1 of the R = (2G-1)^2 + 3 row table.
    """
    num_buckets = image_relative_bucket_count(grid_size)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, device="cpu"), torch.arange(grid_size, device="cpu"), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()
    delta_row = rows[:, None] - rows[None, :] + grid_size - 1
    delta_col = cols[:, None] - cols[None, :] + grid_size - 1
    index = torch.zeros(grid_size * grid_size + 1, grid_size * grid_size + 1, dtype=torch.long, device="cpu")
    index[1:, 1:] = delta_row * (2 * grid_size - 1) + delta_col
    index[0, :] = num_buckets - 3
    index[:, 0] = num_buckets - 2
    index[0, 0] = num_buckets - 1
    return index


def image_relative_bucket_count(grid_size: int) -> int:
    return (2 * grid_size - 1) ** 2 + 3


def image_position_ids(height: int, width: int, grid_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Position ids of an height x width patch grid laid on the grid_size-wide table, row-major, from 1."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return (rows * grid_size + cols + 1).flatten()


@_on_cpu
def decoder_image_position_ids(code_grid: int, grid_size: int, max_target_positions: int) -> torch.Tensor:
    """Image position id of each decoder step when the decoder writes VQ codes (length max_target + 2).

    Step 0 (bos) gets id 0, steps 1..code_grid^2 walk the code grid, later steps a filler id.
    """
    grid = image_position_ids(code_grid, code_grid, grid_size, device=torch.device("cpu"))
    filler = max_target_positions + 2 - 1 - grid.numel()
    return torch.cat([torch.zeros(1, dtype=torch.long), grid, torch.full((filler,), 1024, dtype=torch.long)])
