/* Admin page: users (create, role, activate/deactivate, reset password), model rollback, settings. */
(function () {
  "use strict";
  var me = null;

  async function loadUsers() {
    var data = await HL.api("GET", "/api/users");
    var tbody = document.querySelector("#users tbody");
    tbody.innerHTML = data.users.map(function (u) {
      var other = u.role === "admin" ? "reviewer" : "admin";
      return '<tr data-user="' + HL.esc(u.username) + '">' +
        "<td>" + HL.esc(u.username) + "</td><td>" + HL.esc(u.display_name || "\u2013") + "</td>" +
        '<td><span class="role role-' + HL.esc(u.role) + '">' + HL.esc(u.role) + "</span></td>" +
        "<td>" + (u.active ? '<span class="pill-ok">active</span>' : '<span class="pill-bad">disabled</span>') + "</td>" +
        "<td>" + HL.time(u.created_at) + "</td>" +
        '<td><button class="btn" data-act="role" data-role="' + other + '">Make ' + other + "</button> " +
        '<button class="btn ' + (u.active ? "btn-danger" : "") + '" data-act="active" data-active="' + (!u.active) + '">' +
        (u.active ? "Disable" : "Enable") + "</button> " +
        '<button class="btn" data-act="password">Reset password</button></td></tr>';
    }).join("");
  }

  async function loadModels() {
    var tbody = document.querySelector("#models tbody");
    try {
      var data = await HL.api("GET", "/api/models");
      tbody.innerHTML = data.models.map(function (m) {
        return '<tr data-version="' + HL.esc(m.version) + '"><td class="mono">' + HL.esc(m.version) + "</td>" +
          "<td>" + (m.current ? '<span class="pill-ok">current</span>' : "") + "</td>" +
          '<td class="mono">' + HL.esc(m.parent || "\u2013") + "</td>" +
          '<td class="num">' + HL.fmt(m.val_dice, 3) + "</td>" +
          '<td class="num">' + (m.train_cases === null || m.train_cases === undefined ? "\u2013" : m.train_cases) + "</td>" +
          '<td class="num">' + (m.val_cases === null || m.val_cases === undefined ? "\u2013" : m.val_cases) + "</td>" +
          "<td>" + HL.time(m.created_at) + "</td>" +
          "<td>" + (m.current ? "" : '<button class="btn btn-danger" data-act="rollback">Roll back to this</button>') + "</td></tr>";
      }).join("") || '<tr><td colspan="8" class="empty">No model yet (cold start).</td></tr>';
    } catch (err) {
      tbody.innerHTML = '<tr><td colspan="8" class="empty">' + HL.esc(err.message) + "</td></tr>";
    }
  }

  async function loadSettings() {
    var data = await HL.api("GET", "/api/settings");
    document.getElementById("settings").textContent = JSON.stringify(data.settings, null, 2);
  }

  document.getElementById("new-user").addEventListener("submit", async function (e) {
    e.preventDefault();
    var f = e.target;
    try {
      await HL.api("POST", "/api/users", {
        username: f.username.value.trim(), display_name: f.display_name.value.trim(),
        role: f.role.value, password: f.password.value
      });
      HL.toast("User " + f.username.value.trim() + " added");
      f.reset();
      loadUsers();
    } catch (err) { HL.toast(err.message, "error"); }
  });

  document.querySelector("#users tbody").addEventListener("click", async function (e) {
    var btn = e.target.closest("button[data-act]");
    if (!btn) return;
    var name = btn.closest("tr").dataset.user;
    var body = {};
    if (btn.dataset.act === "role") body.role = btn.dataset.role;
    if (btn.dataset.act === "active") body.active = btn.dataset.active === "true";
    if (btn.dataset.act === "password") {
      var pw = window.prompt("New password for " + name + " (8+ characters):");
      if (!pw) return;
      body.password = pw;
    }
    try {
      await HL.api("PATCH", "/api/users/" + encodeURIComponent(name), body);
      HL.toast("User " + name + " changed");
      loadUsers();
    } catch (err) { HL.toast(err.message, "error"); }
  });

  document.querySelector("#models tbody").addEventListener("click", async function (e) {
    var btn = e.target.closest("button[data-act=rollback]");
    if (!btn) return;
    var version = btn.closest("tr").dataset.version;
    if (!window.confirm("Make model " + version + " current? New cases will be contoured with it.")) return;
    try {
      await HL.api("POST", "/api/models/" + encodeURIComponent(version) + "/rollback");
      HL.toast("Model " + version + " is current");
      loadModels();
    } catch (err) { HL.toast(err.message, "error"); }
  });

  loadUsers().catch(function (err) { HL.toast(err.message, "error"); });
  loadModels();
  loadSettings().catch(function (err) { document.getElementById("settings").textContent = err.message; });
})();
