// The cachetier dashboard: polls the balancer's /api/cluster and /api/history every second
// and draws the proxy table and three charts as inline SVG. No library, no build step.
'use strict';

const POLL_MS = 1000;
const WINDOW_MS = 5 * 60 * 1000;
const COLORS = { a: '#4ea1ff', b: '#c678dd', up: '#2fbf71' };

const $ = (sel) => document.querySelector(sel);

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

function fmtNum(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return '–';
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + 'M';
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + 'k';
  return n.toFixed(digits);
}

function fmtPct(r) {
  return r === null || r === undefined ? '–' : (r * 100).toFixed(1) + '%';
}

function fmtUs(us) {
  if (us === 0) return '0';
  if (!us) return '–';
  if (us >= 1e6) return (us / 1e6).toFixed(2) + ' s';
  if (us >= 1e3) return (us / 1e3).toFixed(us >= 1e4 ? 0 : 1) + ' ms';
  return us + ' µs';
}

function fmtAgo(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return s + ' s ago';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s ago';
  return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min ago';
}

function fmtClock(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour12: false });
}

// A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

// Draws series [{name, color, points: [[t, v|null], ...]}] as an SVG line chart into `fig`.
function drawChart(fig, series, opts) {
  const plot = fig.querySelector('.plot');
  const W = Math.max(300, plot.clientWidth || 600);
  const H = 180;
  const L = 52, R = 10, T = 8, B = 22;
  const now = opts.now;
  const t0 = now - WINDOW_MS;
  let max = opts.max;
  if (max === undefined) {
    let top = 0;
    for (const s of series) for (const [, v] of s.points) if (v !== null && v > top) top = v;
    max = opts.log ? Math.pow(10, Math.ceil(Math.log10(Math.max(top, opts.min * 10)))) : niceMax(top * 1.1);
  }
  const x = (t) => L + ((t - t0) / WINDOW_MS) * (W - L - R);
  // Linear from 0, or (opts.log) logarithmic from opts.min: latency spans decades.
  const lo = opts.log ? Math.log10(opts.min) : 0;
  const hi = opts.log ? Math.max(Math.log10(max), lo + 1) : max;
  const scale = (v) => (opts.log ? Math.log10(Math.max(v, opts.min)) : v);
  const y = (v) => T + (1 - (scale(v) - lo) / (hi - lo)) * (H - T - B);
  let ticks = [];
  if (opts.log) {
    for (let d = Math.ceil(lo); d <= Math.floor(hi); d++) ticks.push(Math.pow(10, d));
  } else {
    for (let i = 0; i <= 4; i++) ticks.push((max * i) / 4);
  }
  let svg = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(opts.label)}">`;
  for (const v of ticks) {
    svg += `<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/>`;
    svg += `<text x="${L - 6}" y="${y(v) + 3}" text-anchor="end">${esc(opts.fmt(v))}</text>`;
  }
  for (let m = 5; m >= 0; m--) {
    const t = now - m * 60000;
    svg += `<text x="${x(t)}" y="${H - 6}" text-anchor="middle">${m ? '-' + m + ' min' : 'now'}</text>`;
  }
  let total = 0;
  for (const s of series) {
    // Gaps (null) split the line.
    let runs = [], run = [];
    for (const [t, v] of s.points) {
      if (t < t0) continue;
      if (v === null) { if (run.length) runs.push(run); run = []; continue; }
      run.push(`${x(t).toFixed(1)},${y(Math.min(v, max)).toFixed(1)}`);
    }
    if (run.length) runs.push(run);
    for (const r of runs) {
      total += r.length;
      svg += `<polyline class="series" stroke="${s.color}" points="${r.join(' ')}"/>`;
    }
  }
  svg += '</svg>';
  plot.innerHTML = svg;
  fig.dataset.points = String(total);
  const legend = fig.querySelector('.legend');
  legend.innerHTML = series
    .map((s) => {
      const last = [...s.points].reverse().find(([, v]) => v !== null);
      return `<span><i style="background:${s.color}"></i>${esc(s.name)} ${last ? esc(opts.fmt(last[1])) : '–'}</span>`;
    })
    .join('');
}

function proxyState(p) {
  if (!p.healthy) return 'down';
  return p.consecutive_failures > 0 ? 'failing' : 'up';
}

function render(cluster, history) {
  const now = history.now_ms || Date.now();
  const samples = history.samples || [];
  const last = samples[samples.length - 1] || { proxies: {} };
  const proxies = Object.entries(cluster.proxies || {});
  const up = proxies.filter(([, p]) => p.healthy).length;

  $('#meta').textContent =
    `strategy ${cluster.strategy} · up ${fmtAgo((cluster.uptime_s || 0) * 1000).replace(' ago', '')} · ` +
    `${fmtNum(cluster.total_requests)} requests · ${cluster.connections} connections`;

  const tiles = [
    ['requests / s', fmtNum(last.rps, 0)],
    ['hit ratio', fmtPct(last.hit_ratio)],
    ['GET p50', last.p50_us ? fmtUs(last.p50_us) : '–'],
    ['GET p99', last.p99_us ? fmtUs(last.p99_us) : '–'],
    ['errors / s', fmtNum(last.errors_ps, 1)],
    ['proxies up', `${up} / ${proxies.length}`],
    ['in flight', fmtNum(cluster.in_flight)],
    ['retries', fmtNum(cluster.retries)],
  ];
  $('#tiles').innerHTML = tiles
    .map(([label, value]) => `<div class="tile"><div class="label">${esc(label)}</div><div class="value">${esc(value)}</div></div>`)
    .join('');

  const rows = proxies.map(([name, p]) => {
    const state = proxyState(p);
    const health = (history.health || {})[name];
    const since = health ? `${fmtClock(health.since_ms)} <span class="dim">(${fmtAgo(now - health.since_ms)})</span>` : '–';
    const rate = (last.proxies[name] || {}).rps;
    const m = p.metrics || {};
    return (
      `<tr class="${state}" data-proxy="${esc(name)}" data-state="${state}">` +
      `<td class="addr">${esc(name)}</td>` +
      `<td><span class="badge ${state}">${state.toUpperCase()}</span></td>` +
      `<td>${since}</td>` +
      `<td class="num">${fmtNum(p.in_flight)}</td>` +
      `<td class="num">${fmtNum(rate, 0)}</td>` +
      `<td class="num">${m.hit_rate === undefined ? '–' : fmtPct(m.hit_rate)}</td>` +
      `<td class="num">${fmtNum(p.forwarded)}</td>` +
      `<td class="num">${fmtNum(p.failures)}</td>` +
      `<td class="num">${m.entries === undefined ? '–' : fmtNum(m.entries)}</td></tr>`
    );
  });
  $('#proxies tbody').innerHTML = rows.join('');

  const pts = (f) => samples.map((s) => [s.t, f(s)]);
  drawChart($('#chart-rps'), [{ name: 'cluster', color: COLORS.a, points: pts((s) => s.rps) }], {
    now, label: 'requests per second', fmt: (v) => fmtNum(v, v < 10 ? 1 : 0),
  });
  drawChart($('#chart-hit'), [{ name: 'hits', color: COLORS.up, points: pts((s) => s.hit_ratio) }], {
    now, label: 'hit ratio', max: 1, fmt: (v) => (v * 100).toFixed(0) + '%',
  });
  drawChart(
    $('#chart-latency'),
    [
      { name: 'p50', color: COLORS.a, points: pts((s) => (s.p50_us ? s.p50_us : null)) },
      { name: 'p99', color: COLORS.b, points: pts((s) => (s.p99_us ? s.p99_us : null)) },
    ],
    { now, label: 'GET latency', fmt: fmtUs, log: true, min: 10 },
  );

  // A one-line summary in the title: what a tab shows, and what a test can read.
  document.title =
    `cachetier ${up}/${proxies.length} up · ` +
    proxies.map(([name, p]) => `${name}=${proxyState(p)}`).join(' ') +
    ` · samples=${samples.length}`;
  document.body.dataset.samples = String(samples.length);
  document.body.dataset.updated = String(Date.now());
}

function setConn(ok, error) {
  const el = $('#conn');
  el.className = 'conn ' + (ok ? 'ok' : 'bad');
  el.textContent = ok ? 'live · ' + fmtClock(Date.now()) : 'balancer unreachable';
  if (!ok && error) el.title = String(error);
}

async function getJSON(path) {
  const response = await fetch(path, { cache: 'no-store' });
  if (!response.ok) throw new Error(path + ': HTTP ' + response.status);
  return response.json();
}

async function tick() {
  try {
    const [cluster, history] = await Promise.all([getJSON('/api/cluster'), getJSON('/api/history')]);
    render(cluster, history);
    setConn(true);
  } catch (e) {
    setConn(false, e);
    document.title = 'cachetier · balancer unreachable';
  } finally {
    setTimeout(tick, POLL_MS);
  }
}

tick();
