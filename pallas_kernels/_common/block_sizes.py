"""Block sizes shared by the row-gather kernels (sparse FFN and top-k attention)."""

import dataclasses

from pallas_kernels._common.checks import check_power_of_two


@dataclasses.dataclass(frozen=True)
class GatherBlockSizes:
    """Tiling of the selected rows and of each row's columns.

    Attributes:
      selected: rows gathered per grid step (TPU: rows DMA'd per step; GPU: rows per
        program and per inner step). A power of two >= 8.
      columns: row columns per chunk of the GPU kernels (the TPU kernel copies whole rows).
        A power of two >= 16.
    """

    selected: int = 64
    columns: int = 256

    def __post_init__(self):
        name = type(self).__name__
        check_power_of_two(f"{name}.selected", self.selected, 8)
        check_power_of_two(f"{name}.columns", self.columns, 16)
