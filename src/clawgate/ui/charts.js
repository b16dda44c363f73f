// A rolling series and its SVG sparkline: enough to see whether a figure is flat or climbing.
const SVG = "http://www.w3.org/2000/svg";

export class Series {
  constructor(capacity) { this.capacity = capacity; this.points = []; }
  push(value) {
    this.points.push(value);
    if (this.points.length > this.capacity) this.points.shift();
  }
  get last() { return this.points.length ? this.points[this.points.length - 1] : null; }
}

export function sparkline(series, width = 300, height = 70) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const pts = series.points;
  if (pts.length < 2) return svg;
  const max = Math.max(...pts), min = Math.min(0, ...pts);
  const span = max - min || 1;
  const step = width / (series.capacity - 1);
  const offset = width - step * (pts.length - 1);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", pts.map((v, i) =>
    `${(offset + i * step).toFixed(1)},${(height - 2 - ((v - min) / span) * (height - 4)).toFixed(1)}`).join(" "));
  svg.appendChild(line);
  return svg;
}
