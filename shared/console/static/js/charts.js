// Line charts drawn by uPlot (vendored, loaded globally as window.uPlot): the loss curve of a run and the
// monitoring series. A chart fits its container's width, from a phone to a wide screen, and follows resizes.

import { h } from "./ui.js";

const COLORS = ["#2456c7", "#b3261e", "#1f7a3f", "#a15c00", "#6b3fa0", "#00838f", "#5d4037", "#c2185b"];
const MIN_WIDTH = 260;

function widthOf(container) {
  return Math.max(MIN_WIDTH, Math.floor(container.getBoundingClientRect().width) || MIN_WIDTH);
}

// A chart in `container` (already in the document): `series` is [{label, color?, dash?}], `time` whether x is a
// Unix time in seconds (else a number, e.g. an epoch). Returns {update(data), destroy()}; data is
// [xs, ys1, ys2, ...] with null for a missing point.
export function lineChart(container, { title, series, time = true, xLabel, yLabel, height = 220 }) {
  const pad = time ? 3600 : 1;
  const options = {
    title,
    width: widthOf(container),
    height,
    // One point alone would stretch the axis over years: give it an hour (or one unit) on each side.
    scales: { x: { time, range: (_, min, max) => (min !== null && min === max ? [min - pad, max + pad] : [min, max]) } },
    legend: { live: true },
    series: [
      { label: xLabel || (time ? "time" : "x") },
      ...series.map((s, index) => ({
        label: s.label,
        stroke: s.color || COLORS[index % COLORS.length],
        width: 2,
        dash: s.dash,
        spanGaps: true,
        points: { show: true, size: 5 },
      })),
    ],
    axes: [{ label: xLabel }, { label: yLabel }],
  };
  const empty = [[], ...series.map(() => [])];
  const plot = new window.uPlot(options, empty, container);
  const observer = new ResizeObserver(() => plot.setSize({ width: widthOf(container), height }));
  observer.observe(container);
  return {
    plot,
    update(data) { plot.setData(data); },
    destroy() { observer.disconnect(); plot.destroy(); },
  };
}

// A titled box for a chart, with a note for when there is nothing to draw yet.
export function chartBox(id, note) {
  return h("div", { class: "chart", id, "data-chart": id }, note ? h("p", { class: "muted chart-note" }, note) : null);
}

export function seconds(iso) {
  return Date.parse(iso) / 1000;
}
