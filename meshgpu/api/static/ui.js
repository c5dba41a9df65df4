// meshgpu console: fragments refreshed in place, a log tail over Server-Sent Events, SVG charts.
// No library; part of meshgpu (same license). Served from /ui/static/ui.js.
"use strict";
(function () {
  const CSRF = { "X-Meshgpu-CSRF": "1" };
  const REFRESH_MS = 2000;
  const HISTORY_MS = 3000;
  const LOG_LINES = 2000;

  async function post(url, body, signedIn = true) {
    const r = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: Object.assign({ "Content-Type": "application/json" }, CSRF),
      body: body === undefined ? "{}" : JSON.stringify(body),
    });
    if (r.status === 401 && signedIn) location.assign("/ui/login");
    return r;
  }

  function wireButtons(root) {
    root.querySelectorAll("[data-post]").forEach((b) => {
      if (b.dataset.wired) return;
      b.dataset.wired = "1";
      b.addEventListener("click", async (ev) => {
        ev.preventDefault();
        if (b.dataset.confirm && !confirm(b.dataset.confirm)) return;
        b.disabled = true;
        const r = await post(b.dataset.post);
        if (b.id === "logout") { location.assign("/ui/login"); return; }
        if (!r.ok) {
          const doc = await r.json().catch(() => ({}));
          alert(doc.detail || doc.title || "failed: " + r.status);
          b.disabled = false;
        }
        refreshAll();
      });
    });
  }

  async function refresh(el) {
    try {
      const r = await fetch(el.dataset.refresh, { credentials: "same-origin" });
      if (r.status === 401) { location.assign("/ui/login"); return; }
      if (!r.ok) return;
      const text = await r.text();
      if (text !== el.dataset.last) {
        el.innerHTML = text;
        el.dataset.last = text;
        wireButtons(el);
      }
    } catch (e) { /* the node is restarting: try again next round */ }
  }

  function refreshAll() {
    document.querySelectorAll("[data-refresh]").forEach(refresh);
  }

  function tailLog(pre) {
    const es = new EventSource(pre.dataset.events, { withCredentials: true });
    let lines = 0;
    function add(text, cls) {
      const line = document.createElement("span");
      line.textContent = text + "\n";
      if (cls) line.className = cls;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.appendChild(line);
      if (++lines > LOG_LINES) { pre.removeChild(pre.firstChild); lines--; }
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
    es.onmessage = (ev) => add(ev.data);
    es.addEventListener("end", (ev) => { add("-- " + ev.data + " --", "note"); es.close(); });
    es.addEventListener("problem", (ev) => { add(ev.data, "bad"); es.close(); });
  }

  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c", "#5c940d"];

  // A line chart of series [{name, t: [...], v: [...]}] into an <svg>; null values are gaps.
  function chart(svg, series, fixedMax, fmt) {
    const W = 480, H = 160, L = 48, B = 18, T = 8, R = 8;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const ts = series.flatMap((s) => s.t);
    const vs = series.flatMap((s) => s.v.filter((x) => x !== null));
    svg.dataset.points = String(vs.length);
    if (!ts.length || !vs.length) {
      const n = document.createElementNS(SVG, "text");
      n.setAttribute("x", W / 2); n.setAttribute("y", H / 2); n.setAttribute("text-anchor", "middle");
      n.textContent = "no samples yet";
      svg.appendChild(n);
      return;
    }
    const t0 = Math.min(...ts), t1 = Math.max(...ts, t0 + 1);
    const top = fixedMax || Math.max(...vs, 1e-9) * 1.1;
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
    const y = (v) => H - B - (v / top) * (H - B - T);
    for (const frac of [0, 0.5, 1]) {
      const g = document.createElementNS(SVG, "line");
      g.setAttribute("x1", L); g.setAttribute("x2", W - R);
      g.setAttribute("y1", y(top * frac)); g.setAttribute("y2", y(top * frac));
      g.setAttribute("class", "grid");
      svg.appendChild(g);
      const lab = document.createElementNS(SVG, "text");
      lab.setAttribute("x", L - 4); lab.setAttribute("y", y(top * frac) + 4);
      lab.setAttribute("text-anchor", "end");
      lab.textContent = fmt(top * frac);
      svg.appendChild(lab);
    }
    series.forEach((s, k) => {
      let d = "", pen = false;
      s.t.forEach((t, i) => {
        const v = s.v[i];
        if (v === null) { pen = false; return; }
        d += (pen ? "L" : "M") + x(t).toFixed(1) + " " + y(v).toFixed(1);
        pen = true;
      });
      const p = document.createElementNS(SVG, "path");
      p.setAttribute("d", d);
      p.setAttribute("stroke", COLORS[k % COLORS.length]);
      p.setAttribute("class", "line");
      p.dataset.series = s.name;
      const tip = document.createElementNS(SVG, "title");
      tip.textContent = s.name;
      p.appendChild(tip);
      svg.appendChild(p);
    });
    const when = document.createElementNS(SVG, "text");
    when.setAttribute("x", W - R); when.setAttribute("y", H - 4); when.setAttribute("text-anchor", "end");
    when.textContent = new Date(t1 * 1000).toLocaleTimeString();
    svg.appendChild(when);
  }

  function bytes(v) {
    if (v === 0) return "0";
    if (v >= 1 << 30) return (v / (1 << 30)).toFixed(1) + "G";
    if (v >= 1 << 20) return (v / (1 << 20)).toFixed(0) + "M";
    return (v / 1024).toFixed(0) + "K";
  }

  async function drawHistory(box) {
    try {
      const r = await fetch(box.dataset.history, { credentials: "same-origin" });
      if (!r.ok) return;
      const doc = await r.json();
      const job = doc.jobs[0] || { t: [], cpu_pct: [], memory_bytes: [], gpus: [] };
      const gpus = (job.gpus || []).map((g) => ({ name: "gpu" + g.index, t: g.t, v: g.utilization_pct }));
      chart(document.getElementById("chart-gpu"), gpus, 100, (v) => v.toFixed(0));
      chart(document.getElementById("chart-cpu"), [{ name: "cpu", t: job.t || [], v: job.cpu_pct || [] }], 0, (v) => v.toFixed(v < 10 ? 1 : 0));
      chart(document.getElementById("chart-mem"), [{ name: "memory", t: job.t || [], v: job.memory_bytes || [] }], 0, bytes);
    } catch (e) { /* try again next round */ }
  }

  function login(form) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const err = document.getElementById("login-error");
      err.textContent = "";
      const r = await post(form.dataset.login, { token: form.token.value }, false);
      if (r.status === 204) { location.assign("/ui/runs"); return; }
      const doc = await r.json().catch(() => ({}));
      err.textContent = doc.detail || doc.title || "sign-in failed (" + r.status + ")";
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    wireButtons(document);
    const form = document.getElementById("login");
    if (form) login(form);
    if (document.querySelector("[data-refresh]")) setInterval(refreshAll, REFRESH_MS);
    document.querySelectorAll("pre[data-events]").forEach(tailLog);
    document.querySelectorAll("[data-history]").forEach((box) => {
      drawHistory(box);
      setInterval(() => drawHistory(box), HISTORY_MS);
    });
  });
})();
