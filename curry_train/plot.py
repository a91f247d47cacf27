"""A small PNG writer: an RGB canvas with lines, filled rectangles and a 3x5 bitmap font.

The project's plots (``scripts/runs_diff.py``'s loss curves, ``scripts/advise.py``'s memory
breakdown) are drawn with it, so plotting needs nothing beyond the project's own dependencies.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Sequence

# 3 columns x 5 rows per glyph, row by row. Lower-case letters without a glyph of their own are
# drawn as capitals.
GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "000111111100111", "s": "000111100001111", "t": "010111010010011",
    "p": "000111101111100", "l": "110010010010111", "o": "000111101101111", " ": "000000000000000",
    "x": "000101010101000", "(": "010100100100010", ")": "010001001001010", "/": "001001010100100",
    ":": "000010000010000", "=": "000111000111000", "%": "101001010100101", ",": "000000000010100",
    "_": "000000000000111",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111",
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

Color = tuple[int, int, int]


def glyph(char: str) -> str:
    return GLYPHS.get(char) or GLYPHS.get(char.upper()) or GLYPHS[" "]


class Canvas:
    """An RGB pixel canvas that draws lines, rectangles and tiny text and encodes itself as PNG."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.rows = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def dot(self, x: int, y: int, color: Color, size: int = 1) -> None:
        for yy in range(y - size // 2, y - size // 2 + size):
            for xx in range(x - size // 2, x - size // 2 + size):
                if 0 <= xx < self.width and 0 <= yy < self.height:
                    self.rows[yy][3 * xx : 3 * xx + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, size: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color, size)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill the pixels x0 <= x < x1, y0 <= y < y1 (clipped to the canvas)."""
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x1 > x0:
            for y in range(y0, y1):
                self.rows[y][3 * x0 : 3 * x1] = bytes(color) * (x1 - x0)

    def text(self, x: int, y: int, text: str, color: Color = (0, 0, 0), scale: int = 2) -> None:
        for index, char in enumerate(text):
            for bit, on in enumerate(glyph(char)):
                if on == "1":
                    self.rect(x + (4 * index + bit % 3) * scale, y + (bit // 3) * scale,
                              x + (4 * index + bit % 3 + 1) * scale, y + (bit // 3 + 1) * scale, color)

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return 4 * len(text) * scale

    def png(self) -> bytes:
        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)  # filter type 0 on every scanline
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.png())


def stacked_bars(
    bars: Sequence[tuple[str, dict[str, float]]],
    parts: Sequence[str],
    path: Path,
    limit: float | None = None,
    limit_label: str = "",
    unit: tuple[float, str] = (2**30, "GiB"),
    title: str = "",
) -> None:
    """One horizontal bar per ``(label, {part: value})``, its ``parts`` stacked left to right in the
    colours of the legend, and a vertical line at ``limit`` (e.g. the device's memory)."""
    scale_value, unit_name = unit
    # One case throughout: the font's few lower-case glyphs do not mix well with its capitals.
    bars = [(label.upper(), values) for label, values in bars]
    title, limit_label, unit_name = title.upper(), limit_label.upper(), unit_name.upper()
    label_width = max([Canvas.text_width(label) for label, _ in bars] + [80]) + 16
    bar_height, gap, top = 22, 10, 60
    width = max(760, label_width + 560)
    height = top + len(bars) * (bar_height + gap) + 50
    canvas = Canvas(width, height)
    left, right = label_width, width - 30
    totals = [sum(values.get(part, 0.0) for part in parts) for _, values in bars]
    high = max(totals + [limit or 0.0]) * 1.05 or 1.0
    to_x = lambda v: round(left + v / high * (right - left))  # noqa: E731
    canvas.text(8, 8, title)
    legend_x = 8
    for index, part in enumerate(parts):
        color = COLORS[index % len(COLORS)]
        canvas.rect(legend_x, 30, legend_x + 12, 42, color)
        canvas.text(legend_x + 16, 31, part.upper())
        legend_x += 16 + Canvas.text_width(part) + 16  # the same width in either case
    for tick in range(5):
        value = high * tick / 4
        x = to_x(value)
        canvas.line(x, top - 4, x, height - 40, (230, 230, 230))
        tick = f"{value / scale_value:.3g}".upper()
        canvas.text(min(x - 10, width - Canvas.text_width(tick) - 2), height - 32, tick)
    canvas.text(right - Canvas.text_width(unit_name), height - 16, unit_name)
    for row, (label, values) in enumerate(bars):
        y = top + row * (bar_height + gap)
        canvas.text(8, y + bar_height // 2 - 5, label)
        x = 0.0
        for index, part in enumerate(parts):
            value = values.get(part, 0.0)
            if value > 0:
                canvas.rect(to_x(x), y, max(to_x(x + value), to_x(x) + 1), y + bar_height, COLORS[index % len(COLORS)])
            x += value
    canvas.line(left, top - 4, left, height - 40, (0, 0, 0))
    if limit is not None:
        canvas.line(to_x(limit), top - 8, to_x(limit), height - 40, (0, 0, 0), 3)
        canvas.text(min(to_x(limit) + 4, width - Canvas.text_width(limit_label) - 2), top - 14, limit_label)
    canvas.save(path)
