"""The one table printer: aligned columns for a terminal, or a Markdown table for a report.

Every table the `flywheel` command and the benchmarks print goes through `render` (or `print_table`, which
prints what `render` returns). A row is a sequence of cells in the order of the headers, or a mapping read by
header name (a missing key is an empty cell). A cell prints as `str(cell)`, and None as `none`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

NUMBERS = "numbers"
"""`align=NUMBERS`: each cell that reads as a number (`1,234`, `0.47`, `12%`, `2.50x`, `~3 ±5%`) is right-aligned,
every other cell and the headers left-aligned: the benchmarks' tables, where figures and words share columns."""

Row = Sequence[Any] | Mapping[str, Any]


def render(
    headers: Sequence[str],
    rows: Sequence[Row],
    *,
    align: str = "",
    rule: bool = False,
    none: str = "-",
    empty: str | None = None,
    markdown: bool = False,
) -> str:
    """The table as text, one line per row, columns two spaces apart, trailing spaces stripped.

    `align` is one `<` (left) or `>` (right) per column, headers included (columns past its end are left-aligned),
    or NUMBERS. `rule` puts a line of dashes under the headers. `empty`, when given, is what an empty table
    prints instead. `markdown` makes a Markdown table of the same cells (alignment and rule do not apply).
    """
    if not rows and empty is not None:
        return empty
    cells = [[str(h) for h in headers], *[_cells(row, headers, none) for row in rows]]
    if markdown:
        lines = [_markdown_line(cells[0]), "|" + "---|" * len(headers)]
        return "\n".join(lines + [_markdown_line(row) for row in cells[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [_line(cells[0], widths, align, header=True)]
    if rule:
        lines.append("  ".join("-" * width for width in widths))
    lines += [_line(row, widths, align, header=False) for row in cells[1:]]
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Row], *, out: TextIO | None = None, **options: Any) -> str:
    """Print `render(headers, rows, **options)` to `out` (stdout by default) and return it."""
    text = render(headers, rows, **options)
    print(text, file=out or sys.stdout, flush=True)
    return text


def _cells(row: Row, headers: Sequence[str], none: str) -> list[str]:
    values = [row.get(h, "") for h in headers] if isinstance(row, Mapping) else list(row)
    return [none if value is None else str(value) for value in values]


def _markdown_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _line(cells: list[str], widths: list[int], align: str, *, header: bool) -> str:
    parts = (
        cell.rjust(width) if _right(align, column, cell, header) else cell.ljust(width)
        for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
    )
    return "  ".join(parts).rstrip()


def _right(align: str, column: int, cell: str, header: bool) -> bool:
    if align == NUMBERS:
        return not header and _reads_as_number(cell)
    return column < len(align) and align[column] == ">"


def _reads_as_number(text: str) -> bool:
    head = text.lstrip("+-~").split(" ")[0].replace(",", "").replace(".", "").rstrip("x%")
    return head.isdigit()
