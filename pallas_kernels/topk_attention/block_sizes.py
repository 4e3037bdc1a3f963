"""Block sizes of the top-k attention kernels, frozen and checked at construction."""

import dataclasses

from pallas_kernels._common.checks import check_power_of_two


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the selected keys and of the cache rows.

    Attributes:
      selected: keys gathered per grid step (TPU: rows DMA'd per step; GPU: rows per
        program and per inner step). A power of two >= 8.
      columns: cache-row columns per chunk of the GPU kernels (the TPU kernel copies whole
        rows). A power of two >= 16.
    """

    selected: int = 64
    columns: int = 256

    def __post_init__(self):
        check_power_of_two("BlockSizes.selected", self.selected, 8)
        check_power_of_two("BlockSizes.columns", self.columns, 16)
