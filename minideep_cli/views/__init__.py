"""Rendering only: training and tokenizing progress, routing reports in the terminal (rich), the
live sampling panel, the self-contained HTML report and bench tables. Everything here turns plain
data from the engines into output."""


def count(n: int, noun: str) -> str:
    """n and noun, plural unless n is 1: "1 layer", "2 layers", "1,200 documents"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def duration(seconds: float) -> str:
    """A run's length in the unit that shows it: "8.2 s", "45 s", "3.5 min", "2.1 h"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
