/* HeartLoop shared browser helpers, exported as the global `HL`.
 *
 * HL.api(method, path, body[, options]) -> Promise of the parsed JSON answer (or an ArrayBuffer
 *   for application/octet-stream answers, or null for an empty answer).
 *   options.background = true marks an automatic request (polling): it does not count as user
 *   activity for the idle timeout.
 *   - sends the CSRF token from <meta name="csrf-token"> in the X-CSRF-Token header;
 *   - sends `body` as JSON when given;
 *   - on 401 redirects to /login?next=<this page> (and rejects);
 *   - on any other non-2xx throws an Error whose message is the server's `error` text
 *     (err.status holds the HTTP status, err.body the parsed answer when JSON).
 * HL.csrf() -> the page's CSRF token.
 * HL.esc(text) -> text escaped for HTML.
 * HL.fmt(value, digits) -> number formatted, or an en dash for null/undefined.
 * HL.time(when) -> local "YYYY-MM-DD HH:MM" text (epoch seconds or an ISO 8601 string).
 * HL.toast(message, kind) -> a short message at the bottom of the page ("ok" | "error").
 * The signature of HL.api is stable: the viewer and the dashboard depend on it.
 */
(function () {
  "use strict";

  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function setCsrf(token) {
    var meta = document.querySelector('meta[name="csrf-token"]');
    if (meta && token) meta.setAttribute("content", token);
  }

  function toLogin() {
    var here = window.location.pathname + window.location.search;
    window.location.assign("/login?next=" + encodeURIComponent(here));
  }

  async function api(method, path, body, options) {
    method = (method || "GET").toUpperCase();
    var headers = { "Accept": "application/json" };
    if (options && options.background) headers["X-HeartLoop-Background"] = "1";
    var init = { method: method, headers: headers, credentials: "same-origin", cache: "no-store" };
    if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = csrf();
    if (body !== undefined && body !== null) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    var rsp = await fetch(path, init);
    var type = rsp.headers.get("Content-Type") || "";
    var data = null;
    if (type.indexOf("application/json") >= 0) {
      try { data = await rsp.json(); } catch (e) { data = null; }
    } else if (type.indexOf("application/octet-stream") >= 0) {
      data = await rsp.arrayBuffer();
    } else {
      var text = await rsp.text();
      data = text ? { error: text } : null;
    }
    if (rsp.status === 401) {
      toLogin();
      var e401 = new Error((data && data.error) || "log in first");
      e401.status = 401;
      e401.body = data;
      throw e401;
    }
    if (!rsp.ok) {
      var err = new Error((data && data.error) || (rsp.status + " " + rsp.statusText));
      err.status = rsp.status;
      err.body = data;
      throw err;
    }
    if (data && typeof data === "object" && !(data instanceof ArrayBuffer) && data.csrf_token) {
      setCsrf(data.csrf_token);  // a new login answers a new token
    }
    return data;
  }

  function esc(text) {
    return String(text === null || text === undefined ? "" : text)
      .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "\u2013";
    return Number(value).toFixed(digits === undefined ? 2 : digits);
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function time(when) {
    if (when === null || when === undefined || when === "") return "\u2013";
    var d = typeof when === "string" ? new Date(when) : new Date(when * 1000);
    if (Number.isNaN(d.getTime())) return String(when);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes());
  }

  var toastTimer = null;
  function toast(message, kind) {
    var el = document.getElementById("hl-toast");
    if (!el) {
      el = document.createElement("div");
      el.id = "hl-toast";
      el.setAttribute("role", "status");
      document.body.appendChild(el);
    }
    el.textContent = message;
    el.className = "toast " + (kind || "ok");
    el.hidden = false;
    if (toastTimer) clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { el.hidden = true; }, 4000);
  }

  window.HL = { api: api, csrf: csrf, esc: esc, fmt: fmt, time: time, toast: toast };
})();
