"""Block sizes of the sparse FFN kernels, frozen and checked at construction."""

import dataclasses

from pallas_kernels._common.checks import check_power_of_two


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the selected neurons and of the weight rows.

    Attributes:
      selected: neurons gathered per grid step (TPU: rows DMA'd per step; GPU: rows per
        program and per inner step). A power of two >= 8.
      columns: weight-row columns per chunk of the GPU kernels (the TPU kernel copies whole
        rows). A power of two >= 16.
    """

    selected: int = 64
    columns: int = 256

    def __post_init__(self):
        check_power_of_two("BlockSizes.selected", self.selected, 8)
        check_power_of_two("BlockSizes.columns", self.columns, 16)
