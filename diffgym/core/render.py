"""A tiny NumPy rasterizer for ``rgb_array`` frames (rendering is not dynamics, so no Warp here)."""

from __future__ import annotations

import numpy as np

Color = tuple[int, int, int]


class Canvas:
    """An RGB image over the world rectangle ``xlim x ylim`` (y up), drawn with anti-alias-free masks."""

    def __init__(self, width: int, height: int, xlim: tuple[float, float], ylim: tuple[float, float],
                 background: Color = (255, 255, 255)):
        self.image = np.empty((height, width, 3), dtype=np.uint8)
        self.image[:] = background
        xs = xlim[0] + (np.arange(width) + 0.5) * (xlim[1] - xlim[0]) / width
        ys = ylim[1] - (np.arange(height) + 0.5) * (ylim[1] - ylim[0]) / height
        self._x, self._y = np.meshgrid(xs, ys)
        self.pixel = (xlim[1] - xlim[0]) / width

    def _fill(self, mask: np.ndarray, color: Color) -> None:
        self.image[mask] = color

    def circle(self, center, radius: float, color: Color) -> None:
        radius = max(radius, self.pixel)
        self._fill((self._x - center[0]) ** 2 + (self._y - center[1]) ** 2 <= radius**2, color)

    def ring(self, center, radius: float, width: float, color: Color) -> None:
        d = np.hypot(self._x - center[0], self._y - center[1])
        self._fill(np.abs(d - radius) <= max(width, self.pixel) / 2, color)

    def line(self, start, end, width: float, color: Color) -> None:
        """A segment drawn as a capsule of the given width (world units)."""
        p, q = np.asarray(start, float), np.asarray(end, float)
        dx, dy = q - p
        length2 = dx * dx + dy * dy
        t = 0.0 if length2 == 0 else np.clip(((self._x - p[0]) * dx + (self._y - p[1]) * dy) / length2, 0, 1)
        d2 = (self._x - p[0] - t * dx) ** 2 + (self._y - p[1] - t * dy) ** 2
        self._fill(d2 <= (max(width, self.pixel) / 2) ** 2, color)

    def polygon(self, points, color: Color) -> None:
        """A filled polygon (even-odd rule, so concave shapes work)."""
        pts = np.asarray(points, float)
        inside = np.zeros(self._x.shape, dtype=bool)
        for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
            crosses = (y0 > self._y) != (y1 > self._y)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = x0 + (self._y - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (self._x < x_at)
        self._fill(inside, color)
