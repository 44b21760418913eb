/* Dashboard: per-case figures (dots) with running means (line), drawn as inline SVG, and the
 * trainer panel. Data: GET /api/dashboard and GET /api/trainer (see docs/review-api.md). */
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var W = 420, H = 220, L = 44, R = 10, T = 10, B = 28;

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var m = [1, 2, 2.5, 5, 10].find(function (f) { return f * p >= v; });
    return m * p;
  }

  function plot(container, cases, means) {
    var key = container.dataset.key, digits = Number(container.dataset.digits || 2);
    var points = cases.map(function (c) { return { x: c.order, y: c[key], c: c }; });
    var values = points.map(function (p) { return p.y; }).filter(function (v) { return v !== null && v !== undefined; });
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": container.parentNode.querySelector("figcaption").textContent });
    container.replaceChildren(svg);
    if (!values.length) {
      svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "class": "none" }, "no data yet"));
      return;
    }
    var n = Math.max(cases.length, 2);
    var ymax = container.dataset.max ? Number(container.dataset.max) : niceMax(Math.max.apply(null, values));
    function sx(x) { return L + (x - 1) / (n - 1) * (W - L - R); }
    function sy(y) { return H - B - (y / ymax) * (H - T - B); }
    svg.appendChild(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, "class": "axis" }));
    svg.appendChild(el("line", { x1: L, y1: T, x2: L, y2: H - B, "class": "axis" }));
    [0, 0.5, 1].forEach(function (f) {
      svg.appendChild(el("text", { x: L - 4, y: sy(f * ymax) + 3, "text-anchor": "end", "class": "tick" },
        HL.fmt(f * ymax, ymax >= 10 ? 0 : digits)));
    });
    var step = Math.max(1, Math.ceil(cases.length / 8));
    cases.forEach(function (c, i) {
      if (i % step === 0 || i === cases.length - 1) {
        svg.appendChild(el("text", { x: sx(c.order), y: H - B + 14, "text-anchor": "middle", "class": "tick" }, c.order));
      }
    });
    svg.appendChild(el("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle", "class": "tick" }, "case order"));
    points.forEach(function (p) {
      if (p.y === null || p.y === undefined) return;
      var dot = el("circle", { cx: sx(p.x), cy: sy(p.y), r: 3.5, "class": "dot" });
      dot.appendChild(el("title", {}, "case " + p.c.case_id + ": " + HL.fmt(p.y, digits) + " " + (container.dataset.unit || "")));
      svg.appendChild(dot);
    });
    var path = "";
    (means[key] || []).forEach(function (m, i) {
      if (m === null || m === undefined) return;
      path += (path ? " L" : "M") + sx(cases[i].order).toFixed(1) + "," + sy(m).toFixed(1);
    });
    if (path) svg.appendChild(el("path", { d: path, "class": "mean" }));
  }

  function table(cases) {
    var body = document.querySelector("#dash-table tbody");
    body.innerHTML = cases.map(function (c) {
      return "<tr><td class='num'>" + c.order + "</td><td class='num'><a href='/cases/" + c.case_id + "'>" +
        c.case_id + "</a></td><td>" + HL.time(c.corrected_at) + "</td><td class='num'>" +
        HL.fmt(c.active_seconds, 0) + "</td><td class='num'>" + HL.fmt(c.dice, 3) + "</td><td class='num'>" +
        HL.fmt(c.abs_delta_mean_gy, 2) + "</td><td>" + HL.esc(c.model_version || "none (cold start)") +
        "</td><td class='num'>" + c.corrected_voxels + "</td></tr>";
    }).join("");
  }

  function trainer(t) {
    var state = document.getElementById("t-state");
    state.textContent = t.state;
    state.className = "state-" + String(t.state || "").split(" ")[0];
    document.getElementById("t-version").textContent = t.current_version || "none yet";
    document.getElementById("t-dice").textContent = HL.fmt(t.best_val_dice, 3);
    document.getElementById("t-epochs").textContent = t.epochs === null ? "\u2013" : t.epochs;
    document.getElementById("t-stall").textContent = t.epochs_without_progress === null ? "\u2013" : t.epochs_without_progress;
    document.getElementById("t-cases").textContent = (t.train_cases || 0) + " / " + (t.val_cases || 0);
    document.getElementById("t-updated").textContent = t.updated_at ? t.updated_at.replace("T", " ") : "\u2013";
  }

  async function refresh() {
    try {
      var data = await HL.api("GET", "/api/dashboard");
      document.getElementById("dash-empty").hidden = data.cases.length > 0;
      document.querySelectorAll(".plot").forEach(function (c) { plot(c, data.cases, data.running_mean); });
      table(data.cases);
      trainer(await HL.api("GET", "/api/trainer"));
    } catch (err) {
      if (err.status !== 401) HL.toast("Dashboard: " + err.message, "error");
    }
  }

  refresh();
  setInterval(refresh, 10000);
})();
