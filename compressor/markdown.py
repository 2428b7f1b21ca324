"""Markdown tables and numbers as the reports print them (the compression report, the quantization
section, the benchmarks): one formatting, standard library only."""

from __future__ import annotations


def fmt(x, digits: int = 4) -> str:
    """A table cell: — for None, yes/no, thousands separators, tiny floats in scientific notation."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.1e}"
        return f"{x:,.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
