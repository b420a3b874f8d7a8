"""``optimizer.projection_summary()``: what a projected optimizer does with each parameter."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProjectionRow:
    """One parameter: its name (or position), shape, whether it is projected, at which rank and on
    which side, its optimizer-state bytes (held, or to be allocated by its first step), and why a
    weight its group would project stays plain (``note``)."""

    name: str
    shape: tuple[int, ...]
    projected: bool
    rank: int | None
    side: str | None
    state_bytes: int
    note: str | None = None


class ProjectionSummary(tuple):
    """A tuple of :class:`ProjectionRow`; ``str()`` is a readable table with a total line."""

    def __new__(cls, rows):
        return super().__new__(cls, rows)

    @property
    def state_bytes(self) -> int:
        return sum(row.state_bytes for row in self)

    def __str__(self) -> str:
        header = ("parameter", "shape", "projected", "rank", "side", "state bytes", "note")
        lines = [(row.name, "×".join(map(str, row.shape)) or "scalar", "yes" if row.projected else "no",
                  "" if row.rank is None else str(row.rank), row.side or "", f"{row.state_bytes:,}", row.note or "")
                 for row in self]
        projected = sum(row.projected for row in self)
        lines.append((f"total: {len(self)} parameters, {projected} projected", "", "", "", "", f"{self.state_bytes:,}",
                      ""))
        if not any(row.note for row in self):
            header, lines = header[:-1], [cells[:-1] for cells in lines]
        widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
        right = {1, 3, 5}

        def format_row(cells) -> str:
            return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                             for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([format_row(header), rule, *map(format_row, lines[:-1]), rule, format_row(lines[-1])])
