"""Block sizes of the sparse FFN kernels, frozen and checked at construction."""

import dataclasses

from pallas_kernels._common.block_sizes import GatherBlockSizes


@dataclasses.dataclass(frozen=True)
class BlockSizes(GatherBlockSizes):
    """Tiling of the selected neurons (``selected`` per grid step) and of the K2 and V rows
    (``columns`` per GPU chunk); see :class:`GatherBlockSizes` for the rules."""
