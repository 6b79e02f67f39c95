"""``Size``: the one order for extents. Every picture size and network shape ("bucket") in this project is
(width, height), the order PIL, OpenCV and the API's ``network_size``/``inference_size`` use. Numpy arrays
and Triton's dims are indexed [height, width]: ``Size.of`` reads an array's, ``shape`` gives one."""

from __future__ import annotations

from typing import Any, NamedTuple


class Size(NamedTuple):
    width: int
    height: int

    @classmethod
    def of(cls, array: Any) -> Size:
        """The size of an image array indexed [height, width, ...]."""
        return cls(int(array.shape[1]), int(array.shape[0]))

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width): an array's leading dims, Triton's image dims."""
        return self.height, self.width

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def landscape(self) -> bool:
        return self.width >= self.height

    def turned(self) -> Size:
        """The size a quarter turn away (portrait <-> landscape)."""
        return Size(self.height, self.width)
