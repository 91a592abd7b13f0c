// KilnProxy admin dashboard: polls the admin API and draws its own charts on <canvas> (no libraries, no CDN).
// The admin token comes from this page's own URL (?token=...) and is sent as an Authorization header on every fetch.
(function () {
  "use strict";

  const token = new URLSearchParams(window.location.search).get("token") || "";
  const state = { samples: [], lastT: null, interval: 5, window: 900, rows: new Map(), tracing: false };

  const CHARTS = [
    { id: "rss", series: [{ key: "rss_bytes", label: "RSS", color: "#2563eb" }], fmt: fmtBytes,
      binary: true, minStep: 1 << 20 },
    { id: "greenlets", series: [{ key: "greenlets", label: "greenlets", color: "#16a34a" }], fmt: fmtCount,
      minStep: 1 },
    { id: "sessions", series: [{ key: "sessions", label: "all", color: "#7c3aed" },
                               { key: "authenticated", label: "authenticated", color: "#db2777" }], fmt: fmtCount,
      minStep: 1 },
    { id: "bytes", series: [{ key: "bytes_out_per_sec", label: "out", color: "#0891b2" },
                            { key: "bytes_in_per_sec", label: "in", color: "#ea580c" }], fmt: fmtRate,
      binary: true, minStep: 1024 },
    { id: "gc", series: [{ key: "gc_pause_secs", label: "total", color: "#b45309" },
                         { key: "gc_pause_max_secs", label: "longest", color: "#dc2626" }], fmt: fmtSecs,
      minStep: 0.0005 },
    { id: "cpu", series: [{ key: "cpu_percent", label: "CPU", color: "#475569" }], fmt: fmtPercent, minStep: 5 },
  ];

  // -- formatting ------------------------------------------------------------------------------------------------
  function fmtBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? Math.round(n) : Number(n.toFixed(n < 10 ? 2 : 1))) + " " + units[i];
  }
  function fmtRate(n) { return fmtBytes(n) + "/s"; }
  function fmtCount(n) { return Math.round(n).toLocaleString("en-US"); }
  function fmtPercent(n) { return n.toFixed(1) + " %"; }
  function fmtSecs(s) {
    if (s >= 1) return s.toFixed(2) + " s";
    if (s >= 0.001) return (s * 1000).toFixed(1) + " ms";
    return (s * 1e6).toFixed(0) + " µs";
  }
  function el(id) { return document.getElementById(id); }
  function setText(id, text) { el(id).textContent = text; }

  function showBanner(text) {
    const b = el("banner");
    b.textContent = text;
    b.hidden = !text;
  }

  // -- API -------------------------------------------------------------------------------------------------------
  function withToken(path) {
    if (!token) return path;
    return path + (path.indexOf("?") >= 0 ? "&" : "?") + "token=" + encodeURIComponent(token);
  }

  async function api(method, path) {
    const headers = {};
    if (token) headers["Authorization"] = "Bearer " + token;
    const r = await fetch(path, { method: method, headers: headers, cache: "no-store" });
    if (r.status === 401) {
      showBanner("Unauthorized: open this page as /?token=<admin.token>.");
      throw new Error("unauthorized");
    }
    return r;
  }

  async function getJSON(path) {
    const r = await api("GET", path);
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  // -- charts ----------------------------------------------------------------------------------------------------
  // A round grid step >= v: 1, 2, 5 x 10^k, or powers of two of a 1024^k unit for bytes (16 MiB, 32 MiB, ...).
  function niceStep(v, binary, minStep) {
    v = Math.max(v, minStep || 0, 1e-9);
    if (binary) {
      const unit = Math.pow(1024, Math.max(0, Math.floor(Math.log(v) / Math.log(1024))));
      let m = 1;
      while (m * unit < v) m *= 2;
      return m * unit;
    }
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    const m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }

  function drawChart(spec, samples, now) {
    const canvas = el("chart-" + spec.id);
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 340, h = canvas.clientHeight || 150;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const left = 64, right = 8, top = 8, bottom = 20;
    const pw = w - left - right, ph = h - top - bottom;
    const t0 = now - state.window;
    const x = (t) => left + ((t - t0) / state.window) * pw;

    let max = 0;
    for (const s of samples) for (const ser of spec.series) max = Math.max(max, s[ser.key] || 0);
    const ymax = 4 * niceStep((max * 1.1) / 4, spec.binary, spec.minStep);
    const y = (v) => top + ph - (v / ymax) * ph;

    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.strokeStyle = "#e5e7eb";
    ctx.fillStyle = "#6b7280";
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4, yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + pw, yy); ctx.stroke();
      ctx.fillText(spec.fmt(v), left - 6, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = [5, 10, 30, 60, 120, 300, 600, 1800, 3600].find((s) => state.window / s <= 6) || 3600;
    for (let ago = 0; ago <= state.window; ago += step) {
      const xx = Math.round(x(now - ago)) + 0.5;
      const label = ago === 0 ? "now" : "-" + (step >= 60 ? ago / 60 + "m" : ago + "s");
      ctx.beginPath(); ctx.moveTo(xx, top); ctx.lineTo(xx, top + ph); ctx.stroke();
      ctx.fillText(label, Math.min(Math.max(xx, left + 12), left + pw - 12), top + ph + 4);
    }

    let points = 0;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    for (const ser of spec.series) {
      const pts = samples.filter((s) => s.t >= t0 && typeof s[ser.key] === "number");
      if (!pts.length) continue;
      points = Math.max(points, pts.length);
      ctx.strokeStyle = ser.color;
      ctx.fillStyle = ser.color;
      ctx.beginPath();
      pts.forEach((s, i) => (i ? ctx.lineTo(x(s.t), y(s[ser.key])) : ctx.moveTo(x(s.t), y(s[ser.key]))));
      ctx.stroke();
      const last = pts[pts.length - 1];
      ctx.beginPath(); ctx.arc(x(last.t), y(last[ser.key]), 2.5, 0, 2 * Math.PI); ctx.fill();
    }
    canvas.dataset.points = String(points);

    const latest = samples[samples.length - 1];
    const named = spec.series.length > 1;
    setText("latest-" + spec.id, latest
      ? spec.series.map((ser) => (named ? ser.label + " " : "") + spec.fmt(latest[ser.key] || 0)).join(" · ")
      : "");
  }

  function drawAll() {
    // The newest sample is the right edge: the server's clock, so a browser with a skewed clock still sees the data.
    const last = state.samples[state.samples.length - 1];
    const now = last ? last.t : Date.now() / 1000;
    for (const spec of CHARTS) drawChart(spec, state.samples, now);
    const blocked = state.samples.reduce((n, s) => n + (s.hub_blocked || 0), 0);
    setText("blocked", String(blocked));
    el("blocked").className = blocked ? "badge bad" : "badge";
  }

  async function pollSamples() {
    const path = "/debug/samples" + (state.lastT !== null ? "?since=" + state.lastT : "");
    const data = await getJSON(path);
    state.interval = data.interval_secs;
    state.window = data.window_secs;
    for (const s of data.samples) state.samples.push(s);
    if (state.samples.length) state.lastT = state.samples[state.samples.length - 1].t;
    const cutoff = state.lastT - state.window - state.interval;
    while (state.samples.length && state.samples[0].t < cutoff) state.samples.shift();
    const span = state.window >= 120 ? state.window / 60 + " minutes" : state.window + " seconds";
    setText("window-title", "Last " + span);
    setText("sampling", "one sample every " + state.interval + " s" + (data.running ? "" : " (sampler stopped)"));
    drawAll();
  }

  // -- header ----------------------------------------------------------------------------------------------------
  async function pollInfo() {
    const info = await getJSON("/info");
    setText("version", info.Version);
    setText("uptime", info.Uptime);
    setText("started", new Date(info.StartTimeEpochSecs * 1000).toISOString().replace(".000", ""));
    const r = await fetch("/healthz", { cache: "no-store" });
    const health = el("health");
    health.textContent = r.ok ? "ok" : r.status === 503 ? "draining" : "HTTP " + r.status;
    health.className = "badge " + (r.ok ? "ok" : "bad");
  }

  // -- sessions --------------------------------------------------------------------------------------------------
  const COLUMNS = [
    ["Account"], ["Name"], ["PublicKeyName"], ["Command", "command"], ["SessionDuration"],
    ["BytesIn", "num", fmtBytes], ["BytesOut", "num", fmtBytes], ["RemoteAddr"], ["SessionKey"],
  ];

  function newRow(key) {
    const tr = document.createElement("tr");
    tr.dataset.sessionKey = key;
    for (const [, cls] of COLUMNS) {
      const td = document.createElement("td");
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "close-session";
    button.textContent = "Close";
    button.addEventListener("click", () => closeSession(key, tr, button));
    td.appendChild(button);
    tr.appendChild(td);
    return tr;
  }

  // Closing ends somebody's push or clone: the first click arms the button, the second one closes.
  async function closeSession(key, tr, button) {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.classList.add("armed");
      button.textContent = "Confirm close";
      setTimeout(() => {
        if (!button.disabled) {
          button.dataset.armed = "";
          button.classList.remove("armed");
          button.textContent = "Close";
        }
      }, 4000);
      return;
    }
    button.disabled = true;
    button.textContent = "Closing…";
    tr.classList.add("closing");
    try {
      const r = await api("DELETE", "/connections/" + encodeURIComponent(key));
      setText("sessions-status", r.ok ? "Closed session " + key + "." :
        r.status === 404 ? "Session " + key + " had already ended." : "Close failed: HTTP " + r.status);
    } catch (e) {
      setText("sessions-status", "Close failed: " + e.message);
    }
    pollConnections().catch(reportError);
  }

  async function pollConnections() {
    const data = await getJSON("/connections");
    const tbody = el("sessions").tBodies[0];
    const seen = new Set();
    for (const s of data.CurrentlyAuthenticatedUsers) {
      seen.add(s.SessionKey);
      let tr = state.rows.get(s.SessionKey);
      if (!tr) {
        tr = newRow(s.SessionKey);
        state.rows.set(s.SessionKey, tr);
        tbody.appendChild(tr);
      }
      COLUMNS.forEach(([field, , fmt], i) => {
        const v = s[field];
        tr.cells[i].textContent = v === null || v === undefined ? "–" : fmt ? fmt(v) : String(v);
      });
    }
    for (const [key, tr] of state.rows) {
      if (!seen.has(key)) { tr.remove(); state.rows.delete(key); }
    }
    setText("session-count", data.CurrentUserCount + " authenticated" +
      (data.UnauthenticatedCount ? ", " + data.UnauthenticatedCount + " logging in" : ""));
    el("sessions-empty").hidden = data.CurrentUserCount > 0;
  }

  // -- heap ------------------------------------------------------------------------------------------------------
  function fillTable(table, rows) {
    const tbody = table.tBodies[0];
    tbody.replaceChildren();
    for (const cells of rows) {
      const tr = document.createElement("tr");
      for (const [text, cls] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
  }

  async function loadHeap() {
    const button = el("heap-refresh");
    button.disabled = true;
    setText("heap-status", "Walking the heap…");
    try {
      const r = await api("GET", "/debug/heap?limit=15");
      if (r.status === 429) {
        setText("heap-status", "Another heavy request is running; try again in a moment.");
        return;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      const heap = await r.json();
      const growth = new Map(heap.growth.map((g) => [g.type, g.delta]));
      fillTable(el("heap-types"), heap.most_common_types.map((t) => [
        [t.type], [fmtCount(t.count), "num"],
        [growth.has(t.type) ? "+" + fmtCount(growth.get(t.type)) : "", growth.has(t.type) ? "num grow" : "num"],
      ]));
      const tm = heap.tracemalloc;
      state.tracing = !!tm.tracing;
      el("trace-toggle").textContent = state.tracing ? "Stop tracemalloc" : "Start tracemalloc";
      el("heap-sites").hidden = !state.tracing;
      if (state.tracing) {
        fillTable(el("heap-sites"), tm.top.map((s) => [
          [s.file + ":" + s.line], [fmtBytes(s.size_bytes), "num"], [fmtCount(s.count), "num"],
        ]));
      }
      setText("heap-status", fmtCount(heap.objects) + " objects tracked by the GC; the walk held the hub for " +
        fmtSecs(heap.hub_held_secs) + " at most. Growth counts new peaks since the previous heap request." +
        (state.tracing ? " tracemalloc: " + fmtBytes(tm.traced_bytes) + " traced." : ""));
    } catch (e) {
      setText("heap-status", "Heap request failed: " + e.message);
    } finally {
      button.disabled = false;
    }
  }

  async function toggleTracing() {
    const r = await api("POST", state.tracing ? "/debug/tracemalloc/stop" : "/debug/tracemalloc/start");
    if (r.ok) state.tracing = !!(await r.json()).tracing;
    await loadHeap();
  }

  // -- main loop -------------------------------------------------------------------------------------------------
  function reportError(e) {
    if (e.message !== "unauthorized") showBanner("Admin API unreachable: " + e.message);
  }

  async function tick() {
    try {
      await Promise.all([pollSamples(), pollConnections(), pollInfo()]);
      if (el("banner").textContent.startsWith("Admin API unreachable")) showBanner("");
      setText("updated", new Date().toLocaleTimeString());
    } catch (e) {
      reportError(e);
    }
    const delay = Math.min(Math.max(state.interval * 1000, 1000), 5000);
    setTimeout(tick, delay);
  }

  for (const a of document.querySelectorAll("a[data-path]")) a.href = withToken(a.dataset.path);
  el("heap-refresh").addEventListener("click", loadHeap);
  el("trace-toggle").addEventListener("click", () => toggleTracing().catch(reportError));
  window.addEventListener("resize", drawAll);
  tick();
  loadHeap();
})();
