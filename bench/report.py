"""What a run found: ceilings, figures (each with its ceiling ratio and design target), a table."""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COMPARE = {">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass
class Ceiling:
    key: str
    label: str
    value: float
    unit: str
    background: float | None = None


@dataclass
class Figure:
    key: str
    label: str
    value: float
    unit: str
    ceiling: str | None = None  # a Ceiling key
    target: tuple[str, float] | None = None  # ("<", 20.0): a design target, not an assertion
    note: str = ""
    # CPU % (100 = one core) that processes outside the benchmark used while this was measured.
    background: float | None = None
    # The daemon's CPU time per item (event or webhook): robust to a busy neighbour, where
    # throughput is not.
    cpu_us: float | None = None
    # PostgreSQL's CPU time per item (the server's processes), when the engine is PostgreSQL.
    db_cpu_us: float | None = None
    engine: str = "sqlite"
    # CPU % the hypervisor gave other guests meanwhile (part of `background`): on a virtual
    # machine, a latency tail can be that alone.
    steal: float | None = None

    def meets(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target
        return bool(COMPARE[op](self.value, bound))


@dataclass
class Report:
    meta: dict[str, Any]
    ceilings: dict[str, Ceiling] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def ratio(self, figure: Figure) -> float | None:
        ceiling = self.ceilings.get(figure.ceiling or "")
        if ceiling is None or not ceiling.value:
            return None
        return figure.value / ceiling.value

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "ceilings": {k: asdict(c) for k, c in self.ceilings.items()},
            "figures": [
                {**asdict(f), "ratio_to_ceiling": self.ratio(f), "meets_target": f.meets()}
                for f in self.figures
            ],
            "details": self.details,
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")

    def table(self) -> str:
        rows: list[list[str]] = [
            [
                "figure",
                "engine",
                "result",
                "ceiling (floor for latency)",
                "ratio",
                "target",
                "",
                "daemon cpu",
                "postgres cpu",
                "other procs",
            ]
        ]
        for f in self.figures:
            ceiling = self.ceilings.get(f.ceiling or "")
            ratio = self.ratio(f)
            meets = f.meets()
            rows.append(
                [
                    f.label,
                    f.engine,
                    f"{number(f.value)} {f.unit}",
                    f"{ceiling.label} {number(ceiling.value)}" if ceiling else "",
                    f"{ratio:.2f}" if ratio is not None else "",
                    f"{f.target[0]} {number(f.target[1])}" if f.target else "",
                    "" if meets is None else ("meets" if meets else "MISSES"),
                    "" if f.cpu_us is None else f"{f.cpu_us:.0f} µs/item",
                    "" if f.db_cpu_us is None else f"{f.db_cpu_us:.0f} µs/item",
                    ("" if f.background is None else f"{f.background:.0f} % cpu")
                    + ("" if not f.steal else f" ({f.steal:.0f} % steal)"),
                ]
            )
        rows.append([""] * len(rows[0]))
        for c in self.ceilings.values():
            background = "" if c.background is None else f"{c.background:.0f} % cpu"
            rows.append(
                [f"ceiling: {c.label}", "", f"{number(c.value)} {c.unit}", *[""] * 6, background]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for index, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)


def number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
