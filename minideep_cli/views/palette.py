"""One colour per expert, the same in the terminal and in the HTML report."""

from __future__ import annotations

import colorsys

GOLDEN = 0.618033988749895
BLOCKS = " ▁▂▃▄▅▆▇█"


def expert_hex(e: int) -> str:
    """Well-separated hues for any number of experts (golden-ratio steps around the wheel)."""
    r, g, b = colorsys.hls_to_rgb((0.02 + e * GOLDEN) % 1.0, 0.58, 0.75)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def spark(values, top: float | None = None) -> str:
    """Values >= 0 as a row of block characters scaled to `top` (default: the largest)."""
    values = list(values)
    top = top if top is not None else max(values, default=0)
    if not values or top <= 0:
        return BLOCKS[0] * len(values)
    return "".join(BLOCKS[min(8, max(0, round(8 * v / top)))] for v in values)


def bar(frac: float, width: int = 20) -> str:
    """A horizontal bar of `width` cells filled to frac (eighths of a cell)."""
    eighths = round(max(0.0, min(1.0, frac)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")).ljust(width)
