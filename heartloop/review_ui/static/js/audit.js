/* Audit log page: GET /api/audit with filters and paging; GET /api/audit/verify. */
(function () {
  "use strict";
  var tbody = document.querySelector("#audit tbody");
  var form = document.getElementById("filters");
  var older = document.getElementById("older");
  var errorBox = document.getElementById("error");
  var result = document.getElementById("verify-result");
  var brokenId = null;
  var oldestShown = null;

  function params(before) {
    var q = new URLSearchParams();
    ["actor", "action", "target"].forEach(function (k) {
      var v = document.getElementById("f-" + k).value.trim();
      if (v) q.set(k, v);
    });
    q.set("limit", document.getElementById("f-limit").value);
    if (before) q.set("before", before);
    return q.toString();
  }

  function detail(d) {
    var parts = [];
    Object.keys(d || {}).forEach(function (k) { parts.push(k + "=" + (typeof d[k] === "object" ? JSON.stringify(d[k]) : d[k])); });
    return parts.join(", ");
  }

  function row(e) {
    var t = new Date(e.at * 1000);
    return '<tr data-id="' + e.id + '"' + (e.id === brokenId ? ' class="is-broken"' : "") + ">" +
      '<td class="num">' + e.id + "</td>" +
      '<td class="mono">' + HL.esc(t.toLocaleString()) + "</td>" +
      "<td>" + HL.esc(e.actor) + "</td>" +
      "<td>" + HL.esc(e.action) + "</td>" +
      '<td class="mono">' + HL.esc(e.target) + "</td>" +
      '<td class="wrap small">' + HL.esc(detail(e.detail)) + "</td>" +
      '<td class="mono small" title="' + HL.esc(e.hash) + '">' + HL.esc(e.hash.slice(0, 10)) + "…</td></tr>";
  }

  async function load(before) {
    try {
      var data = await HL.api("GET", "/api/audit?" + params(before));
      var html = data.entries.map(row).join("");
      if (before) tbody.insertAdjacentHTML("beforeend", html);
      else tbody.innerHTML = html || '<tr><td colspan="7" class="empty">No entries match.</td></tr>';
      var limit = Number(document.getElementById("f-limit").value);
      oldestShown = data.entries.length ? data.entries[data.entries.length - 1].id : oldestShown;
      older.disabled = data.entries.length < limit;
      errorBox.hidden = true;
    } catch (err) {
      errorBox.textContent = "Could not load the audit log: " + err.message;
      errorBox.hidden = false;
    }
  }

  form.addEventListener("submit", function (e) { e.preventDefault(); load(null); });
  older.addEventListener("click", function () { if (oldestShown) load(oldestShown); });
  document.getElementById("verify").addEventListener("click", async function () {
    result.textContent = "Checking…";
    result.className = "verify-result";
    try {
      var v = await HL.api("GET", "/api/audit/verify");
      if (v.ok) {
        brokenId = null;
        result.textContent = "OK — " + v.rows + " rows, chain intact";
        result.className = "verify-result pill-ok";
      } else {
        brokenId = v.broken_id;
        result.textContent = "BROKEN at row #" + v.broken_id + ": " + v.reason;
        result.className = "verify-result pill-bad";
      }
      load(null);
    } catch (err) {
      result.textContent = "Could not verify: " + err.message;
      result.className = "verify-result pill-bad";
    }
  });
  load(null);
})();
