"""Block sizes of the statistical top-k kernels, frozen and checked at construction."""

import dataclasses

from pallas_kernels._common.checks import check_power_of_two


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the [rows, d] input.

    Attributes:
      rows: rows per grid step (both kernels). A power of two >= 8, so TPU blocks meet the
        8-sublane rule and Triton blocks the power-of-two rule.
      columns: columns per inner-loop chunk of the GPU kernel (the TPU kernel holds whole
        rows in VMEM). A power of two >= 16.
    """

    rows: int = 16
    columns: int = 512

    def __post_init__(self):
        check_power_of_two("BlockSizes.rows", self.rows, 8)
        check_power_of_two("BlockSizes.columns", self.columns, 16)
