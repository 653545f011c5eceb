// A small line chart on a canvas: in and out messages per second over a sliding window.
// No library: a few dozen lines draw the axes, the grid and two polylines.

const WINDOW_MS = 5 * 60 * 1000;

/** A grid step that reads well (1, 2, 2.5 or 5 times a power of ten), at least `raw`. */
function niceStep(raw) {
  if (!(raw > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (raw <= step * power) return step * power;
  }
  return 10 * power;
}

function formatRate(value) {
  if (value >= 1e6) return (value / 1e6).toFixed(value >= 1e7 ? 0 : 1) + 'M';
  if (value >= 1e3) return (value / 1e3).toFixed(value >= 1e4 ? 0 : 1) + 'k';
  return value >= 10 || value === 0 ? value.toFixed(0) : value.toFixed(1);
}

export class RateChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.samples = [];
    const style = getComputedStyle(document.documentElement);
    this.colors = {
      in: style.getPropertyValue('--in').trim() || '#1f77b4',
      out: style.getPropertyValue('--out').trim() || '#e8710a',
      line: style.getPropertyValue('--line').trim() || '#d9dde4',
      text: style.getPropertyValue('--muted').trim() || '#5c6677',
    };
    if (typeof ResizeObserver === 'function') {
      new ResizeObserver(() => this.draw()).observe(canvas);
    }
  }

  /** Adds one sample (time in ms, rates in messages per second) and forgets old ones. */
  add(at, received, sent) {
    this.samples.push({ at, received, sent });
    while (this.samples.length > 0 && this.samples[0].at < at - WINDOW_MS) this.samples.shift();
    this.canvas.dataset.samples = String(this.samples.length);
    this.draw();
  }

  clear() {
    this.samples = [];
    this.canvas.dataset.samples = '0';
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (width === 0 || height === 0) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const g = canvas.getContext('2d');
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = '12px system-ui, "DejaVu Sans", sans-serif';

    const left = 48, right = 8, top = 8, bottom = 22;
    const plotW = Math.max(1, width - left - right);
    const plotH = Math.max(1, height - top - bottom);
    const now = this.samples.length ? this.samples[this.samples.length - 1].at : Date.now();
    const start = now - WINDOW_MS;
    const peak = this.samples.reduce((m, s) => Math.max(m, s.received, s.sent), 0);
    // Up to four grid steps of a round size above zero.
    const stepSize = niceStep(peak / 4);
    const steps = Math.min(4, Math.max(1, Math.ceil(peak / stepSize)));
    const max = stepSize * steps;
    const x = (at) => left + ((at - start) / WINDOW_MS) * plotW;
    const y = (value) => top + plotH - (value / max) * plotH;

    // Grid and labels: four horizontal lines, a tick per minute.
    g.strokeStyle = this.colors.line;
    g.fillStyle = this.colors.text;
    g.lineWidth = 1;
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    for (let i = 0; i <= steps; i++) {
      const value = stepSize * i;
      const py = Math.round(y(value)) + 0.5;
      g.beginPath(); g.moveTo(left, py); g.lineTo(left + plotW, py); g.stroke();
      g.fillText(formatRate(value), left - 6, py);
    }
    g.textAlign = 'center';
    g.textBaseline = 'top';
    for (let minute = 5; minute >= 0; minute--) {
      const px = x(now - minute * 60000);
      g.fillText(minute === 0 ? 'now' : `-${minute} min`, Math.min(Math.max(px, left + 16), left + plotW - 12), top + plotH + 5);
    }

    for (const [key, color] of [['received', this.colors.in], ['sent', this.colors.out]]) {
      g.strokeStyle = color;
      g.lineWidth = 2;
      g.beginPath();
      this.samples.forEach((s, i) => {
        const px = x(s.at), py = y(s[key]);
        if (i === 0) g.moveTo(px, py); else g.lineTo(px, py);
      });
      g.stroke();
    }
  }
}

export { formatRate };
