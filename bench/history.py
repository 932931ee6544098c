"""What keeping a delivery history costs: the same runs with history off and on.

- historycost: batched end to end (100 tenants, ingest running) and the unbatched drain
  over 1,000 tenants, each run twice on fresh daemons: with `history_retention = "0"` (no
  history at all) and with the default (7 days, payloads kept). The figure is the ratio
  of the two rates, beside both rates and the daemon's CPU per webhook in each; the
  issue's design target is >= 0.85. The runs alternate off, on, so that a neighbour's load
  that comes and goes does not favour one side.
"""

from __future__ import annotations

from typing import Any

from bench.context import Context
from bench.delivery import drain, end_to_end
from bench.report import Figure

OFF = {"history_retention": "0"}
ON: dict[str, Any] = {}  # the defaults: history kept 7 days, with payloads


async def history_cost(ctx: Context) -> None:
    runs: dict[str, dict[str, dict[str, Any]]] = {"e2e": {}, "unbatched1000": {}}
    for side, options in (("off", OFF), ("on", ON)):
        ctx.say(f"  history {side}: batched end to end")
        runs["e2e"][side] = await end_to_end(ctx, f"history_{side}_e2e", **options)
        ctx.say(f"  history {side}: unbatched drain over 1000 tenants")
        runs["unbatched1000"][side] = await drain(
            ctx,
            f"history_{side}_unbatched1000",
            tenants=1000,
            per_tenant=ctx.size(30, 5),
            per_request=ctx.size(30, 5),
            batching=False,
            timeout=90.0,
            **options,
        )
    for key, label in (
        ("e2e", "batched end to end"),
        ("unbatched1000", "unbatched drain, 1000 tenants"),
    ):
        off, on = runs[key]["off"], runs[key]["on"]
        ratio = on["per_s"] / off["per_s"] if off["per_s"] else 0.0
        cpu_off = off["daemon_cpu_us_per_webhook"] or 0.0
        cpu_on = on["daemon_cpu_us_per_webhook"] or 0.0
        note = (
            f"off {off['per_s']:,.0f}/s ({cpu_off:.0f} µs), on {on['per_s']:,.0f}/s "
            f"({cpu_on:.0f} µs)"
        )
        ctx.report.details.setdefault("historycost", {})[key] = {
            "off_per_s": off["per_s"],
            "on_per_s": on["per_s"],
            "ratio": ratio,
            "off_daemon_cpu_us_per_webhook": cpu_off,
            "on_daemon_cpu_us_per_webhook": cpu_on,
            "off_postgres_cpu_us_per_webhook": off["postgres_cpu_us_per_webhook"],
            "on_postgres_cpu_us_per_webhook": on["postgres_cpu_us_per_webhook"],
        }
        ctx.report.figures.append(
            Figure(
                f"history_cost_{key}",
                f"history on / off: {label}",
                ratio,
                "×",
                target=(">=", 0.85),
                note=note,
                background=on["cpu_percent"]["others"],
                steal=on["cpu_percent"].get("steal"),
                cpu_us=cpu_on,
                db_cpu_us=on["postgres_cpu_us_per_webhook"],
            )
        )
        ctx.say(f"  {label}: history on / off = {ratio:.2f} ({note})")
