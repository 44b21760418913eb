/* Worklist: GET /api/cases every 5 s with the chosen filters; rows open /cases/<id>. */
(function () {
  "use strict";
  var REFRESH_MS = 5000;
  var tbody = document.querySelector("#cases tbody");
  var stateSel = document.getElementById("filter-state");
  var flaggedBox = document.getElementById("filter-flagged");
  var nextBtn = document.getElementById("review-next");
  var summary = document.getElementById("summary");
  var refreshed = document.getElementById("refreshed");
  var errorBox = document.getElementById("error");
  var timer = null;

  // Filters survive a reload through the page's query string.
  var params = new URLSearchParams(window.location.search);
  if (params.get("state")) stateSel.value = params.get("state");
  if (params.get("flagged") === "1") flaggedBox.checked = true;

  function query() {
    var q = new URLSearchParams();
    if (stateSel.value) q.set("state", stateSel.value);
    if (flaggedBox.checked) q.set("flagged", "1");
    return q.toString();
  }

  function badge(state) {
    return '<span class="badge state-' + HL.esc(state.toLowerCase()) + '">' + HL.esc(state.replace("_", " ")) + "</span>";
  }

  function flags(c) {
    var out = [];
    if (c.dose_flagged) out.push('<span class="flag flag-dose" title="Corrected vs predicted mean heart dose differs beyond the threshold">Δ dose</span>');
    if (c.incomplete) out.push('<span class="flag flag-incomplete" title="' + HL.esc(c.reason || "Series incomplete") + '">Incomplete</span>');
    if (c.state === "FAILED" || c.state === "UNSUPPORTED") out.push('<span class="flag flag-error" title="' + HL.esc(c.reason || "") + '">' + HL.esc(c.state === "FAILED" ? "Failed" : "Unsupported") + "</span>");
    return out.join(" ");
  }

  function delta(v) {
    if (v === null || v === undefined) return "\u2013";
    return (v > 0 ? "+" : "") + HL.fmt(v, 2) + " Gy";
  }

  function render(data) {
    var rows = data.cases.map(function (c) {
      var cls = ["row-link"];
      if (c.id === data.next_case_id) cls.push("is-next");
      if (c.reviewable) cls.push("is-reviewable");
      return '<tr class="' + cls.join(" ") + '" data-id="' + c.id + '" tabindex="0">' +
        '<td class="num"><a href="/cases/' + c.id + '">' + c.id + "</a></td>" +
        "<td>" + badge(c.state) + "</td>" +
        '<td class="mono">' + HL.esc(c.patient_id || "\u2013") + "</td>" +
        "<td>" + HL.time(c.arrived_at) + "</td>" +
        '<td class="num">' + (c.n_slices === null ? "\u2013" : c.n_slices) + "</td>" +
        '<td class="mono">' + HL.esc(c.model_version || "\u2013") + "</td>" +
        '<td class="num">' + (c.predicted_mean_gy === null ? "\u2013" : HL.fmt(c.predicted_mean_gy, 2) + " Gy") + "</td>" +
        '<td class="num' + (c.dose_flagged ? " warn" : "") + '">' + delta(c.mean_delta_gy) + "</td>" +
        "<td>" + flags(c) + "</td></tr>";
    });
    tbody.innerHTML = rows.length ? rows.join("") :
      '<tr><td colspan="9" class="empty">No cases match these filters.</td></tr>';
    var toReview = data.cases.filter(function (c) { return c.reviewable; }).length;
    summary.textContent = data.cases.length + " case" + (data.cases.length === 1 ? "" : "s") + " shown, " +
      toReview + " to review.";
    if (data.next_case_id !== null && data.next_case_id !== undefined) {
      nextBtn.href = "/cases/" + data.next_case_id;
      nextBtn.removeAttribute("aria-disabled");
      nextBtn.textContent = "Review next case (#" + data.next_case_id + ")";
    } else {
      nextBtn.href = "#";
      nextBtn.setAttribute("aria-disabled", "true");
      nextBtn.textContent = "Nothing to review";
    }
    refreshed.textContent = "Updated " + new Date().toLocaleTimeString();
  }

  async function load(background) {
    if (timer) clearTimeout(timer);
    try {
      var q = query();
      render(await HL.api("GET", "/api/cases" + (q ? "?" + q : ""), null, { background: background === true }));
      errorBox.hidden = true;
    } catch (err) {
      if (err.status === 401) return;
      errorBox.textContent = "Could not load the worklist: " + err.message;
      errorBox.hidden = false;
    }
    timer = setTimeout(function () { load(true); }, REFRESH_MS);
  }

  function filtersChanged() {
    var q = query();
    history.replaceState(null, "", q ? "?" + q : window.location.pathname);
    load();
  }

  stateSel.addEventListener("change", filtersChanged);
  flaggedBox.addEventListener("change", filtersChanged);
  document.getElementById("filters").addEventListener("submit", function (e) { e.preventDefault(); });
  nextBtn.addEventListener("click", function (e) {
    if (nextBtn.getAttribute("aria-disabled") === "true") e.preventDefault();
  });
  tbody.addEventListener("click", function (e) {
    var tr = e.target.closest("tr[data-id]");
    if (tr && !e.target.closest("a")) window.location.assign("/cases/" + tr.dataset.id);
  });
  tbody.addEventListener("keydown", function (e) {
    var tr = e.target.closest("tr[data-id]");
    if (tr && e.key === "Enter") window.location.assign("/cases/" + tr.dataset.id);
  });
  document.addEventListener("visibilitychange", function () { if (!document.hidden) load(true); });
  load();
})();
