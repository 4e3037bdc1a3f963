"""Block sizes of the top-k attention kernels, frozen and checked at construction."""

import dataclasses

from pallas_kernels._common.block_sizes import GatherBlockSizes


@dataclasses.dataclass(frozen=True)
class BlockSizes(GatherBlockSizes):
    """Tiling of the selected keys (``selected`` per grid step) and of the cached key and value
    rows (``columns`` per GPU chunk); see :class:`GatherBlockSizes` for the rules."""
