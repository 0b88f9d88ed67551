"""`flywheel monitor MODEL`: one served model's monitoring report in the terminal (partner key).

One row per version: its role, predictions per window as a sparkline (oldest left), the last window's
p50/p99 latency, live accuracy with its 95% interval and the labels it rests on beside the evaluation
baseline, macro-F1, drift (Jensen-Shannon distance of predicted classes and KS statistic of confidences, each
with its sparkline), and the resources this replica spends on it. Then shadow versions (agreement with what
was returned) and the active alerts. `--watch N` redraws every N seconds.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from shared.tables import print_table

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None]) -> str:
    """One character per value, scaled between the smallest and largest; a missing value is a space."""
    present = [v for v in values if v is not None]
    if not present:
        return " " * len(values)
    low, high = min(present), max(present)
    span = high - low
    chars = []
    for value in values:
        if value is None:
            chars.append(" ")
        else:
            chars.append(BARS[int((value - low) / span * (len(BARS) - 1))] if span else BARS[len(BARS) // 2])
    return "".join(chars)


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value * 100:.1f}%"


def _num(value: float | None, digits: int = 3) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _input_ks(inputs: dict[str, Any] | None) -> str | None:
    """The larger KS statistic of text length or brightness; `n/a` when the version has no input baseline."""
    if not inputs:
        return None
    if not inputs.get("judged"):
        return "n/a"
    values = [inputs[key] for key in ("chars_ks", "brightness_ks") if inputs.get(key) is not None]
    return _num(max(values)) if values else None


def version_rows(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    windows = report["windows"]
    for summary in report["versions"]:
        key = str(summary["version"])
        series = [window["versions"].get(key) or {} for window in windows]
        last = series[-1] if series else {}
        quality = last.get("quality") or {}
        drift = last.get("drift") or {}
        baseline = summary.get("baseline") or {}
        resources = summary.get("resources") or {}
        interval = (
            f"[{_pct(quality['ci_low'])}, {_pct(quality['ci_high'])}]" if quality.get("accuracy") is not None else None
        )
        memory = resources.get("memory_bytes")
        rows.append(
            [
                f"v{summary['version']}",
                summary["role"],
                sparkline([s.get("predictions") for s in series]),
                last.get("predictions", 0),
                _num((last.get("latency") or {}).get("p50_ms"), 1),
                _num((last.get("latency") or {}).get("p99_ms"), 1),
                _pct(quality.get("accuracy")),
                interval,
                quality.get("labeled", 0),
                _pct(baseline.get("accuracy")),
                _num(quality.get("macro_f1")),
                sparkline([(s.get("drift") or {}).get("prediction_js") for s in series]),
                _num(drift.get("prediction_js")),
                _num(drift.get("confidence_ks")),
                _input_ks(last.get("input_drift")),
                resources.get("rows"),
                _num(resources.get("compute_seconds"), 2),
                resources.get("queue_rejections"),
                None if memory is None else f"{memory / 2**20:.0f} MiB",
            ]
        )
    return rows


HEADERS = [
    "version",
    "role",
    "traffic",
    "preds",
    "p50 ms",
    "p99 ms",
    "live acc",
    "95% CI",
    "labels",
    "eval acc",
    "macro-F1",
    "drift",
    "JS",
    "KS",
    "input KS",
    "rows",
    "compute s",
    "rejected",
    "memory",
]


def print_report(report: dict[str, Any], out: TextIO | None = None) -> None:
    windows = report["windows"]
    span = f"{len(windows)} windows of {report['window_s']:.0f}s" if windows else "no windows"
    print(f"model {report['model_name']}: {span}, newest last", file=out)
    print_table(HEADERS, version_rows(report), out=out, rule=True)
    shadow = windows[-1]["shadow"] if windows else {}
    if shadow:
        print("\nshadow (last window)", file=out)
        print_table(
            ["version", "shadowed", "failed", "agreement", "accuracy", "production accuracy", "p99 ms"],
            [
                [
                    f"v{version}",
                    s["shadowed"],
                    s["failed"],
                    _pct(s["agreement"]),
                    _pct(s["accuracy"]),
                    _pct(s["production_accuracy"]),
                    _num(s["latency"]["p99_ms"], 1),
                ]
                for version, s in sorted(shadow.items())
            ],
            out=out,
            rule=True,
        )
    alerts = report.get("alerts") or []
    print(f"\nactive alerts: {len(alerts)}", file=out)
    for alert in alerts:
        print(f"  {alert['created_at']}  v{alert['model_version']}  {alert['kind']}: {alert['reason']}", file=out)


def monitor(client: Any, model: str, *, windows: int, window_s: int | None, watch: float | None) -> int:
    params: dict[str, Any] = {"windows": windows}
    if window_s:
        params["window_s"] = window_s
    while True:
        report = client.get(f"/v1/monitoring/models/{model}", params=params)
        if watch:
            print("\033[2J\033[H", end="")
        print_report(report)
        if not watch:
            return 0
        time.sleep(watch)
