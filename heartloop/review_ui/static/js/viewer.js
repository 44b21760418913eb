/* HeartLoop viewer: axial, sagittal and coronal views of one case with linked cursors, windowing,
 * zoom/pan, overlays (prediction blue, foreground red, background green, corrected outline, dose),
 * brush/eraser painting with undo/redo, an optional bounding box, and save & next.
 *
 * Data flow (docs/review-api.md): case meta -> the first slice (drawn at once) -> CT slabs streamed
 * nearest-first into one Int16Array -> everything after that is drawn from memory. Paint goes into a
 * Uint8Array label volume (0 none, 1 foreground, 2 background) over the CT's [k, j, i] grid; a view is
 * recomposed only when something it shows changed, at the next animation frame.
 *
 * window.heartloopViewer exposes the state for tests and scripts (read-only use, please).
 */
(function () {
  "use strict";

  var root = document.getElementById("viewer");
  if (!root) return;
  var CASE_ID = parseInt(root.getAttribute("data-case-id"), 10);
  var CONCURRENCY = 4;
  var EVENT_FLUSH_MS = 4000;
  var EVENT_THROTTLE_MS = 200;
  var T0 = performance.now();

  // ---------------------------------------------------------------------------------------------
  // State
  var S = {
    meta: null, K: 0, J: 0, I: 0, JI: 0, N: 0,
    ct: null, loaded: null, nLoadedSlices: 0, slabsDone: 0, slabsTotal: 0, slabState: null,
    pred: null, predPending: false, dose: null, doseLoading: false,
    labels: null, counts: { fg: 0, bg: 0 },
    history: new HLV.History(100, 16000000),
    cur: { k: 0, j: 0, i: 0 },
    hover: null,
    tool: "fg", brush: 4,
    win: { preset: "mediastinal", width: HLV.PRESETS.mediastinal.width, level: HLV.PRESETS.mediastinal.level },
    show: { seg: true, ann: true, img: true, outline: false, dose: false },
    box: null, boxApplied: null, boxDraft: null,
    active: "axial", spaceDown: false, saving: false,
    zr: null, lut: null, table: HLV.blendTable(), doseColours: HLV.doseColours(),
    firstImageMs: null, firstImageSinceScriptMs: null, allLoadedMs: null,
    events: [], eventTimes: [], lastEventAt: {}, lastSave: null, error: null
  };
  var OUTLINE = HLV.rgba(255, 214, 0);
  var UNLOADED = HLV.rgba(28, 30, 34);

  function $(id) { return document.getElementById(id); }

  // ---------------------------------------------------------------------------------------------
  // Views and geometry
  var views = {};
  ["axial", "sagittal", "coronal"].forEach(function (name) {
    var canvas = $("vw-canvas-" + name);
    var off = document.createElement("canvas");
    views[name] = {
      name: name, canvas: canvas, ctx: canvas.getContext("2d"), section: canvas.parentNode,
      off: off, offCtx: off.getContext("2d"), img: null, px: null, corr: null,
      W: 1, H: 1, sx: 1, sy: 1, zoom: 1, panX: 0, panY: 0, imageDirty: true, viewDirty: true
    };
  });

  function dpr() { return window.devicePixelRatio || 1; }

  function setupGeometry() {
    var sp = S.meta.spacing_mm;  // [dz, dy, dx]
    var dy = sp[1], dx = sp[2];
    S.zr = HLV.zRows(S.meta.slice_offsets_mm);
    var dims = {
      axial: [S.I, S.J, dx, dy],
      sagittal: [S.J, S.zr.R, dy, S.zr.dz],
      coronal: [S.I, S.zr.R, dx, S.zr.dz]
    };
    Object.keys(dims).forEach(function (name) {
      var v = views[name], d = dims[name];
      v.W = d[0]; v.H = d[1]; v.sx = d[2]; v.sy = d[3];
      v.off.width = v.W; v.off.height = v.H;
      v.img = v.offCtx.createImageData(v.W, v.H);
      v.px = new Uint32Array(v.img.data.buffer);
      v.corr = new Uint8Array(v.W * v.H);
    });
  }

  /* Device-pixel transform of a view: image pixel (u, v) -> canvas (x0 + u*pu, y0 + v*pv). */
  function transform(v) {
    var cw = v.canvas.width, ch = v.canvas.height;
    var s0 = Math.min(cw / (v.W * v.sx), ch / (v.H * v.sy)) * 0.98;
    var s = s0 * v.zoom;
    var pu = v.sx * s, pv = v.sy * s;
    var x0 = (cw - v.W * pu) / 2 + v.panX * dpr();
    var y0 = (ch - v.H * pv) / 2 + v.panY * dpr();
    return { pu: pu, pv: pv, x0: x0, y0: y0 };
  }

  /* Client (CSS px) -> continuous image coordinates of a view (pixel n spans [n, n+1)). */
  function toImage(v, clientX, clientY) {
    var r = v.canvas.getBoundingClientRect();
    var t = transform(v);
    var x = (clientX - r.left) * (v.canvas.width / r.width);
    var y = (clientY - r.top) * (v.canvas.height / r.height);
    return { u: (x - t.x0) / t.pu, v: (y - t.y0) / t.pv };
  }

  /* Integer image pixel -> voxel {k, j, i} or null outside. */
  function voxelAt(v, u, w) {
    if (u < 0 || w < 0 || u >= v.W || w >= v.H) return null;
    if (v.name === "axial") return { k: S.cur.k, j: w, i: u };
    var k = S.zr.rowToK[w];
    if (v.name === "sagittal") return { k: k, j: u, i: S.cur.i };
    return { k: k, j: S.cur.j, i: u };
  }

  function flat(vox) { return (vox.k * S.J + vox.j) * S.I + vox.i; }

  function cursorImage(v) {
    var c = S.cur;
    if (v.name === "axial") return { u: c.i + 0.5, v: c.j + 0.5 };
    var row = S.zr.kToRow[c.k] + 0.5;
    if (v.name === "sagittal") return { u: c.j + 0.5, v: row };
    return { u: c.i + 0.5, v: row };
  }

  function markImage(names) {
    (names || Object.keys(views)).forEach(function (n) { views[n].imageDirty = true; });
    schedule();
  }
  function markView(names) {
    (names || Object.keys(views)).forEach(function (n) { views[n].viewDirty = true; });
    schedule();
  }

  // ---------------------------------------------------------------------------------------------
  // Rendering (requestAnimationFrame; only dirty views)
  var framePending = false;
  var statusDirty = true;
  function schedule() {
    statusDirty = true;
    if (!framePending) {
      framePending = true;
      requestAnimationFrame(frame);
    }
  }

  function frame() {
    framePending = false;
    if (!S.meta) return;
    Object.keys(views).forEach(function (name) {
      var v = views[name];
      if (v.imageDirty) compose(v);
      if (v.imageDirty || v.viewDirty) blit(v);
      v.imageDirty = v.viewDirty = false;
    });
    if (S.firstImageMs === null && S.loaded[S.cur.k]) {
      S.firstImageMs = performance.now();
      S.firstImageSinceScriptMs = S.firstImageMs - T0;
    }
    if (statusDirty) updateStatus();
    statusDirty = false;
  }

  function compose(v) {
    var W = v.W, H = v.H, px = v.px, corr = v.corr;
    var ct = S.ct, labels = S.labels, pred = S.show.seg ? S.pred : null, predAll = S.pred;
    var lut = S.lut, table = S.table, showImg = S.show.img, showAnn = S.show.ann, outline = S.show.outline;
    var JI = S.JI, I = S.I, loaded = S.loaded;
    for (var w = 0; w < H; w++) {
      var k, base, step;
      if (v.name === "axial") { k = S.cur.k; base = k * JI + w * I; step = 1; }
      else if (v.name === "sagittal") { k = S.zr.rowToK[w]; base = k * JI + S.cur.i; step = I; }
      else { k = S.zr.rowToK[w]; base = k * JI + S.cur.j * I; step = 1; }
      var o = w * W;
      if (!loaded[k]) {
        for (var u0 = 0; u0 < W; u0++) { px[o + u0] = UNLOADED; corr[o + u0] = 0; }
        continue;
      }
      for (var u = 0, idx = base; u < W; u++, idx += step) {
        var g = showImg ? lut[ct[idx] + 32768] : 0;
        var lab = labels[idx];
        var code = (pred !== null && pred[idx] ? 1 : 0) | (showAnn ? lab << 1 : 0);
        px[o + u] = table[(code << 8) | g];
        if (outline) corr[o + u] = lab === 1 || (lab !== 2 && predAll !== null && predAll[idx]) ? 1 : 0;
      }
    }
    if (S.show.dose && S.dose) washDose(v);
    if (outline) {
      for (var y = 0; y < H; y++) {
        for (var x = 0; x < W; x++) {
          var p = y * W + x;
          if (!corr[p]) continue;
          if (x === 0 || y === 0 || x === W - 1 || y === H - 1 || !corr[p - 1] || !corr[p + 1] ||
              !corr[p - W] || !corr[p + W]) px[p] = OUTLINE;
        }
      }
    }
    v.offCtx.putImageData(v.img, 0, 0);
  }

  function washDose(v) {
    var W = v.W, H = v.H, px = v.px, dose = S.dose, colours = S.doseColours;
    var data = v.img.data;
    for (var w = 0; w < H; w++) {
      var k, base, step;
      if (v.name === "axial") { k = S.cur.k; base = k * S.JI + w * S.I; step = 1; }
      else if (v.name === "sagittal") { k = S.zr.rowToK[w]; base = k * S.JI + S.cur.i; step = S.I; }
      else { k = S.zr.rowToK[w]; base = k * S.JI + S.cur.j * S.I; step = 1; }
      if (!S.loaded[k]) continue;
      for (var u = 0, idx = base; u < W; u++, idx += step) {
        var c = colours[dose[idx]];
        if (!c) continue;
        var p = (w * W + u) * 4, a = c[3];
        data[p] = data[p] * (1 - a) + c[0] * a;
        data[p + 1] = data[p + 1] * (1 - a) + c[1] * a;
        data[p + 2] = data[p + 2] * (1 - a) + c[2] * a;
      }
    }
    void px;
  }

  function blit(v) {
    var ctx = v.ctx, t = transform(v), d = dpr();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#0c0d0f";
    ctx.fillRect(0, 0, v.canvas.width, v.canvas.height);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(v.off, t.x0, t.y0, v.W * t.pu, v.H * t.pv);
    // Linked cursor: crosshair lines through the other views' planes.
    var c = cursorImage(v);
    ctx.save();
    ctx.lineWidth = 1 * d;
    ctx.setLineDash([6 * d, 5 * d]);
    ctx.strokeStyle = "rgba(255, 196, 0, 0.55)";
    ctx.beginPath();
    ctx.moveTo(t.x0 + c.u * t.pu, t.y0);
    ctx.lineTo(t.x0 + c.u * t.pu, t.y0 + v.H * t.pv);
    ctx.moveTo(t.x0, t.y0 + c.v * t.pv);
    ctx.lineTo(t.x0 + v.W * t.pu, t.y0 + c.v * t.pv);
    ctx.stroke();
    ctx.restore();
    var box = S.boxDraft || S.box;
    if (box) drawBox(v, t, box, S.boxDraft ? "rgba(255,140,0,0.9)" : "rgba(255,140,0,0.7)");
    // Brush outline under the pointer.
    if (S.hover && S.hover.view === v.name && isPaintTool(S.tool)) {
      var r = brushMm();
      ctx.strokeStyle = S.tool === "fg" ? "rgba(255,80,80,.9)" : S.tool === "bg" ? "rgba(80,230,100,.9)" : "rgba(230,230,230,.9)";
      ctx.lineWidth = 1 * d;
      ctx.beginPath();
      ctx.ellipse(t.x0 + S.hover.u * t.pu, t.y0 + S.hover.v * t.pv, r / v.sx * t.pu, r / v.sy * t.pv, 0, 0, 2 * Math.PI);
      ctx.stroke();
    }
    ctx.fillStyle = "rgba(227,230,234,.8)";
    ctx.font = (11 * d) + "px system-ui, sans-serif";
    var label = v.name === "axial" ? "slice " + (S.cur.k + 1) + "/" + S.K :
      v.name === "sagittal" ? "column " + (S.cur.i + 1) + "/" + S.I : "row " + (S.cur.j + 1) + "/" + S.J;
    ctx.fillText(label, 8 * d, v.canvas.height - 8 * d);
  }

  function drawBox(v, t, box, colour) {
    var r;  // [u0, u1, v0, v1] in image pixels
    var zr = S.zr;
    var top = zr.kToRow[box[1] - 1], bottom = zr.kToRow[box[0]] + 1;
    if (v.name === "axial") {
      if (S.cur.k < box[0] || S.cur.k >= box[1]) colour = "rgba(255,140,0,0.3)";
      r = [box[4], box[5], box[2], box[3]];
    } else if (v.name === "sagittal") r = [box[2], box[3], top, bottom];
    else r = [box[4], box[5], top, bottom];
    var ctx = v.ctx;
    ctx.save();
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1.5 * dpr();
    ctx.strokeRect(t.x0 + r[0] * t.pu, t.y0 + r[2] * t.pv, (r[1] - r[0]) * t.pu, (r[3] - r[2]) * t.pv);
    ctx.restore();
  }

  function resize() {
    Object.keys(views).forEach(function (name) {
      var v = views[name], rect = v.section.getBoundingClientRect(), d = dpr();
      var w = Math.max(1, Math.round(rect.width * d)), h = Math.max(1, Math.round(rect.height * d));
      if (v.canvas.width !== w || v.canvas.height !== h) {
        v.canvas.width = w;
        v.canvas.height = h;
        v.viewDirty = true;
      }
    });
    schedule();
  }

  // ---------------------------------------------------------------------------------------------
  // Status bar and toolbar state
  var TOOL_NAMES = { fg: "heart brush", bg: "not-heart brush", erase: "eraser", nav: "cursor", box: "box" };

  function patientMm(vox) {
    var m = S.meta, sp = m.spacing_mm, o = m.origin_mm;
    var a = vox.i * sp[2], b = vox.j * sp[1], z = m.slice_offsets_mm[vox.k];
    return [0, 1, 2].map(function (n) {
      return o[n] + a * m.row_direction[n] + b * m.column_direction[n] + z * m.normal[n];
    });
  }

  function updateStatus() {
    var m = S.meta;
    $("vw-st-state").textContent = m.state;
    $("vw-st-model").textContent = m.prediction ? "model " + m.prediction.model_version :
      "no prediction: contour from scratch";
    $("vw-st-slice").textContent = "slice " + (S.cur.k + 1) + "/" + S.K;
    var hv = S.hover && S.hover.vox;
    if (hv && S.loaded[hv.k]) {
      var hu = S.ct[flat(hv)];
      var mm = patientMm(hv);
      var dose = S.dose && S.meta.dose && S.meta.dose.scale ? S.dose[flat(hv)] * S.meta.dose.scale : null;
      $("vw-st-hu").textContent = hu + " HU" + (S.show.dose && dose !== null ? " · " + dose.toFixed(1) + " Gy" : "");
      $("vw-st-pos").textContent = "(" + mm.map(function (x) { return x.toFixed(1); }).join(", ") + ") mm";
    } else {
      $("vw-st-hu").textContent = "";
      $("vw-st-pos").textContent = "";
    }
    $("vw-st-window").textContent = "W " + round1(S.win.width) + " L " + round1(S.win.level);
    $("vw-st-tool").textContent = TOOL_NAMES[S.tool] + (isPaintTool(S.tool) ? " " + S.brush : "") +
      " · painted " + S.counts.fg + " / " + S.counts.bg;
    var load = S.slabsDone < S.slabsTotal ? "loading " + S.slabsDone + "/" + S.slabsTotal + " slabs" : "loaded";
    if (S.predPending) load += " · prediction…";
    if (S.firstImageSinceScriptMs !== null) load += " · first image " + Math.round(S.firstImageSinceScriptMs) + " ms";
    $("vw-st-load").textContent = load;
    $("vw-save").disabled = S.saving || !canSave();
    $("vw-undo").disabled = S.history.done.length === 0;
    $("vw-redo").disabled = S.history.undone.length === 0;
  }

  function round1(x) { return Math.round(x * 10) / 10; }

  function canSave() { return S.counts.fg + S.counts.bg > 0 && S.slabsDone === S.slabsTotal && !S.predPending; }

  function setTool(tool) {
    S.tool = tool;
    root.querySelectorAll(".vw-tool").forEach(function (b) {
      b.setAttribute("aria-pressed", b.getAttribute("data-tool") === tool ? "true" : "false");
    });
    root.querySelector(".vw-box-actions").hidden = tool !== "box" && !S.box;
    markView();
  }

  function setBrush(n) {
    S.brush = Math.max(1, Math.min(40, n));
    $("vw-brush").value = String(S.brush);
    $("vw-brush-val").textContent = String(S.brush);
    markView();
  }

  function brushMm() { return S.brush * S.meta.spacing_mm[2]; }

  function isPaintTool(tool) { return tool === "fg" || tool === "bg" || tool === "erase"; }

  function setWindow(width, level, preset) {
    S.win.width = Math.max(1, width);
    S.win.level = level;
    S.win.preset = preset || "custom";
    S.lut = HLV.grayLut(S.win.width, S.win.level);
    $("vw-preset").value = S.win.preset;
    $("vw-ww").value = String(round1(S.win.width));
    $("vw-wl").value = String(round1(S.win.level));
    markImage();
  }

  function setPreset(name) {
    var p = HLV.PRESETS[name];
    if (p) { setWindow(p.width, p.level, name); logEvent("window"); }
  }

  function setToggle(name, on) {
    S.show[name] = on;
    var box = root.querySelector('input[data-toggle="' + name + '"]');
    if (box) box.checked = on;
    if (name === "dose" && on) loadDose();
    markImage();
  }

  // ---------------------------------------------------------------------------------------------
  // Navigation
  function clampCursor() {
    S.cur.k = Math.max(0, Math.min(S.K - 1, S.cur.k));
    S.cur.j = Math.max(0, Math.min(S.J - 1, S.cur.j));
    S.cur.i = Math.max(0, Math.min(S.I - 1, S.cur.i));
  }

  function scroll(viewName, delta) {
    var before = [S.cur.k, S.cur.j, S.cur.i];
    if (viewName === "axial") S.cur.k += delta;
    else if (viewName === "sagittal") S.cur.i += delta;
    else S.cur.j += delta;
    clampCursor();
    if (before[0] === S.cur.k && before[1] === S.cur.j && before[2] === S.cur.i) return;
    logEvent("scroll");
    // The view scrolled recomposes; the others only move their crosshair line.
    markImage([viewName]);
    markView();
  }

  function moveCursor(v, img) {
    var vox = voxelAt(v, Math.floor(img.u), Math.floor(img.v));
    if (!vox) return;
    var changed = [];
    if (vox.k !== S.cur.k) changed.push("axial");
    if (vox.i !== S.cur.i) changed.push("sagittal");
    if (vox.j !== S.cur.j) changed.push("coronal");
    S.cur = { k: vox.k, j: vox.j, i: vox.i };
    markImage(changed);
    markView();
  }

  function zoom(v, factor, clientX, clientY) {
    var before = clientX === undefined ? null : toImage(v, clientX, clientY);
    v.zoom = Math.max(0.25, Math.min(40, v.zoom * factor));
    if (before) {  // keep the image point under the pointer where it is
      var after = toImage(v, clientX, clientY), t = transform(v);
      v.panX += (after.u - before.u) * t.pu / dpr();
      v.panY += (after.v - before.v) * t.pv / dpr();
    }
    logEvent("zoom");
    markView([v.name]);
  }

  // ---------------------------------------------------------------------------------------------
  // Painting
  var stroke = null;  // {view, value, last: {u, v}}

  function paintReady(v) {
    if (S.predPending) return false;
    if (v.name === "axial") return S.loaded[S.cur.k] === 1;
    return S.slabsDone === S.slabsTotal;
  }

  function stamp(v, cu, cv, value) {
    var r = brushMm(), ru = r / v.sx, rv = r / v.sy;
    var labels = S.labels, h = S.history;
    var u0 = Math.max(0, Math.floor(cu - ru)), u1 = Math.min(v.W - 1, Math.ceil(cu + ru));
    var w0 = Math.max(0, Math.floor(cv - rv)), w1 = Math.min(v.H - 1, Math.ceil(cv + rv));
    var touched = false;
    for (var w = w0; w <= w1; w++) {
      var dv = (w + 0.5 - cv) / rv;
      for (var u = u0; u <= u1; u++) {
        var du = (u + 0.5 - cu) / ru;
        if (du * du + dv * dv > 1) continue;
        var vox = voxelAt(v, u, w);
        if (!vox || !S.loaded[vox.k]) continue;
        var idx = flat(vox), prev = labels[idx];
        if (prev === value) continue;
        h.record(idx, prev);
        labels[idx] = value;
        count(prev, -1);
        count(value, 1);
        touched = true;
      }
    }
    return touched;
  }

  function count(value, n) {
    if (value === 1) S.counts.fg += n;
    else if (value === 2) S.counts.bg += n;
  }

  function paintTo(v, img) {
    var last = stroke.last, touched = false;
    var du = img.u - last.u, dv = img.v - last.v;
    var ru = brushMm() / v.sx, rv = brushMm() / v.sy;
    var steps = Math.max(1, Math.ceil(Math.max(Math.abs(du) / Math.min(ru, 1), Math.abs(dv) / Math.min(rv, 1)) * 2));
    for (var n = 1; n <= steps; n++) {
      touched = stamp(v, last.u + du * n / steps, last.v + dv * n / steps, stroke.value) || touched;
    }
    stroke.last = img;
    if (touched) markImage([v.name]);  // the other views catch up when the stroke ends
  }

  function startStroke(v, img) {
    var value = S.tool === "fg" ? 1 : S.tool === "bg" ? 2 : 0;
    stroke = { view: v.name, value: value, last: img };
    S.history.begin(value);
    if (stamp(v, img.u, img.v, value)) markImage([v.name]);
  }

  function endStroke() {
    if (!stroke) return;
    var s = S.history.end();
    if (s) logEvent(stroke.value === 0 ? "erase" : "paint");
    stroke = null;
    markImage();
  }

  function recount(s, sign) {
    // sign -1: the stroke was undone (values went from s.value back to s.prev), +1: redone.
    for (var n = 0; n < s.idx.length; n++) {
      if (sign < 0) { count(s.value, -1); count(s.prev[n], 1); }
      else { count(s.prev[n], -1); count(s.value, 1); }
    }
  }

  function undo() {
    var s = S.history.undo(S.labels);
    if (s) { recount(s, -1); logEvent("undo"); markImage(); }
  }

  function redo() {
    var s = S.history.redo(S.labels);
    if (s) { recount(s, 1); logEvent("redo"); markImage(); }
  }

  // ---------------------------------------------------------------------------------------------
  // Bounding box
  function boxFromDrag(v, a, b) {
    var base = S.box ? S.box.slice() : [0, S.K, 0, S.J, 0, S.I];
    var u0 = Math.max(0, Math.floor(Math.min(a.u, b.u))), u1 = Math.min(v.W, Math.ceil(Math.max(a.u, b.u)));
    var w0 = Math.max(0, Math.floor(Math.min(a.v, b.v))), w1 = Math.min(v.H, Math.ceil(Math.max(a.v, b.v)));
    if (u1 <= u0 || w1 <= w0) return base;
    if (v.name === "axial") { base[2] = w0; base[3] = w1; base[4] = u0; base[5] = u1; return base; }
    var kTop = S.zr.rowToK[w0], kBottom = S.zr.rowToK[w1 - 1];
    base[0] = Math.min(kTop, kBottom);
    base[1] = Math.max(kTop, kBottom) + 1;
    if (v.name === "sagittal") { base[2] = u0; base[3] = u1; } else { base[4] = u0; base[5] = u1; }
    return base;
  }

  async function applyBox(box) {
    try {
      await HL.api("POST", "/api/cases/" + CASE_ID + "/box", { box: box });
      S.box = box;
      S.boxApplied = box;
      HL.toast(box ? "Re-prediction inside the box queued" : "Box removed; re-prediction queued", "ok");
      pollPrediction();
    } catch (e) {
      HL.toast(e.message, "error");
    }
    setTool(S.tool);
  }

  var pollTimer = null;
  function pollPrediction() {
    var since = S.meta.updated_at, started = Date.now();
    if (pollTimer) clearInterval(pollTimer);
    pollTimer = setInterval(async function () {
      if (Date.now() - started > 180000) { clearInterval(pollTimer); pollTimer = null; return; }
      try {
        var m = await HL.api("GET", "/api/cases/" + CASE_ID + "?refresh=1", null, { background: true });
        if (m.updated_at !== since) {
          clearInterval(pollTimer);
          pollTimer = null;
          S.meta = m;
          await loadPrediction();
          markImage();
          HL.toast("Prediction updated", "ok");
        }
      } catch (e) { /* keep polling */ }
    }, 2000);
  }

  // ---------------------------------------------------------------------------------------------
  // Pointer and keyboard
  var drag = null;  // {mode, view, x, y, ...}

  function attach(v) {
    var c = v.canvas;
    c.addEventListener("contextmenu", function (e) { e.preventDefault(); });
    c.addEventListener("pointerenter", function () { setActive(v.name); });
    c.addEventListener("pointerdown", function (e) {
      if (!S.meta) return;
      c.focus({ preventScroll: true });
      setActive(v.name);
      var img = toImage(v, e.clientX, e.clientY);
      var mode = null;
      if (e.button === 2 || (e.button === 0 && e.altKey)) mode = "window";
      else if (e.button === 1 || (e.button === 0 && S.spaceDown)) mode = "pan";
      else if (e.button === 0 && (S.tool === "nav" || e.shiftKey)) mode = "cursor";
      else if (e.button === 0 && S.tool === "box") mode = "box";
      else if (e.button === 0 && isPaintTool(S.tool)) {
        if (!paintReady(v)) { HL.toast("Still loading the images: paint in a moment", "error"); return; }
        mode = "paint";
      }
      if (!mode) return;
      e.preventDefault();
      c.setPointerCapture(e.pointerId);
      drag = { mode: mode, view: v.name, x: e.clientX, y: e.clientY, start: img,
               win: { width: S.win.width, level: S.win.level }, pan: { x: v.panX, y: v.panY } };
      if (mode === "cursor") moveCursor(v, img);
      else if (mode === "paint") startStroke(v, img);
    });
    c.addEventListener("pointermove", function (e) {
      if (!S.meta) return;
      var img = toImage(v, e.clientX, e.clientY);
      var vox = voxelAt(v, Math.floor(img.u), Math.floor(img.v));
      S.hover = { view: v.name, u: img.u, v: img.v, vox: vox };
      if (drag && drag.view === v.name) {
        var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
        if (drag.mode === "window") {
          setWindow(drag.win.width * Math.exp(dx / 200), drag.win.level - dy * drag.win.width / 400, "custom");
          logEvent("window");
        } else if (drag.mode === "pan") {
          v.panX = drag.pan.x + dx;
          v.panY = drag.pan.y + dy;
          logEvent("pan");
        } else if (drag.mode === "cursor") moveCursor(v, img);
        else if (drag.mode === "box") S.boxDraft = boxFromDrag(v, drag.start, img);
        else if (drag.mode === "paint" && stroke) paintTo(v, img);
      }
      markView([v.name]);
    });
    function up(e) {
      if (!drag || drag.view !== v.name) return;
      if (drag.mode === "paint") endStroke();
      if (drag.mode === "box" && S.boxDraft) { S.box = S.boxDraft; S.boxDraft = null; setTool("box"); }
      drag = null;
      try { c.releasePointerCapture(e.pointerId); } catch (err) { /* already released */ }
      markView();
    }
    c.addEventListener("pointerup", up);
    c.addEventListener("pointercancel", up);
    c.addEventListener("pointerleave", function () {
      if (S.hover && S.hover.view === v.name && !drag) { S.hover = null; markView([v.name]); }
    });
    c.addEventListener("wheel", function (e) {
      if (!S.meta) return;
      e.preventDefault();
      setActive(v.name);
      if (e.ctrlKey || e.metaKey) zoom(v, e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX, e.clientY);
      else if (e.deltaY !== 0) scroll(v.name, e.deltaY < 0 ? 1 : -1);
    }, { passive: false });
  }

  function setActive(name) {
    if (S.active === name) return;
    S.active = name;
    Object.keys(views).forEach(function (n) { views[n].section.classList.toggle("is-active", n === name); });
  }

  function onKey(e) {
    var tag = (e.target && e.target.tagName) || "";
    var typing = (tag === "INPUT" && e.target.type !== "checkbox" && e.target.type !== "range") ||
      tag === "SELECT" || tag === "TEXTAREA";
    var help = $("vw-help");
    if (e.key === "Escape") { help.hidden = true; return; }
    if (typing || !S.meta) return;
    var key = e.key, ctrl = e.ctrlKey || e.metaKey;
    if (ctrl) {
      if (key === "z" || key === "Z") { e.preventDefault(); if (e.shiftKey) redo(); else undo(); }
      else if (key === "y" || key === "Y") { e.preventDefault(); redo(); }
      else if (key === "Enter") { e.preventDefault(); save(); }
      return;
    }
    if (e.altKey) return;
    var handled = true;
    switch (key) {
      case "?": help.hidden = !help.hidden; break;
      case "f": case "F": setTool("fg"); break;
      case "b": case "B": setTool("bg"); break;
      case "e": case "E": setTool("erase"); break;
      case "c": case "C": setTool("nav"); break;
      case "x": case "X": setTool("box"); break;
      case "[": setBrush(S.brush - 1); break;
      case "]": setBrush(S.brush + 1); break;
      case "z": case "Z": undo(); break;
      case "y": case "Y": redo(); break;
      case "s": case "S": setToggle("seg", !S.show.seg); break;
      case "a": case "A": setToggle("ann", !S.show.ann); break;
      case "i": case "I": setToggle("img", !S.show.img); break;
      case "o": case "O": setToggle("outline", !S.show.outline); break;
      case "d": case "D": setToggle("dose", !S.show.dose); break;
      case "1": setPreset("mediastinal"); break;
      case "2": setPreset("lung"); break;
      case "3": setPreset("bone"); break;
      case "r": case "R": resetView(); break;
      case "+": case "=": zoom(views[S.active], 1.2); break;
      case "-": case "_": zoom(views[S.active], 1 / 1.2); break;
      case "ArrowUp": case "ArrowRight": scroll(S.active, 1); break;
      case "ArrowDown": case "ArrowLeft": scroll(S.active, -1); break;
      case "PageUp": scroll(S.active, 10); break;
      case "PageDown": scroll(S.active, -10); break;
      case "Home": S.cur.k = S.meta.first_slice; markImage(); logEvent("scroll"); break;
      case " ": S.spaceDown = true; break;
      default: handled = false;
    }
    if (handled) e.preventDefault();
  }

  function resetView() {
    Object.keys(views).forEach(function (n) { views[n].zoom = 1; views[n].panX = views[n].panY = 0; });
    logEvent("zoom");
    markView();
  }

  function bindControls() {
    Object.keys(views).forEach(function (n) { attach(views[n]); });
    document.addEventListener("keydown", onKey);
    document.addEventListener("keyup", function (e) { if (e.key === " ") S.spaceDown = false; });
    root.querySelectorAll(".vw-tool").forEach(function (b) {
      b.addEventListener("click", function () { setTool(b.getAttribute("data-tool")); });
    });
    $("vw-brush").addEventListener("input", function (e) { setBrush(parseInt(e.target.value, 10)); });
    $("vw-undo").addEventListener("click", undo);
    $("vw-redo").addEventListener("click", redo);
    $("vw-preset").addEventListener("change", function (e) {
      if (e.target.value !== "custom") setPreset(e.target.value);
    });
    ["vw-ww", "vw-wl"].forEach(function (id) {
      $(id).addEventListener("change", function () {
        var w = parseFloat($("vw-ww").value), l = parseFloat($("vw-wl").value);
        if (isFinite(w) && isFinite(l) && w > 0) { setWindow(w, l, "custom"); logEvent("window"); }
      });
    });
    root.querySelectorAll("input[data-toggle]").forEach(function (box) {
      box.addEventListener("change", function () { setToggle(box.getAttribute("data-toggle"), box.checked); });
    });
    $("vw-help-btn").addEventListener("click", function () { $("vw-help").hidden = false; });
    $("vw-help-close").addEventListener("click", function () { $("vw-help").hidden = true; });
    $("vw-help").addEventListener("click", function (e) { if (e.target === $("vw-help")) $("vw-help").hidden = true; });
    $("vw-save").addEventListener("click", save);
    $("vw-box-apply").addEventListener("click", function () { if (S.box) applyBox(S.box); });
    $("vw-box-clear").addEventListener("click", function () { S.box = null; applyBox(null); markView(); });
    if (window.ResizeObserver) new ResizeObserver(resize).observe(root.querySelector(".vw-views"));
    window.addEventListener("resize", resize);
    window.addEventListener("pagehide", function () { flushEvents(true); });
  }

  // ---------------------------------------------------------------------------------------------
  // Interaction events (batched to POST /events)
  function logEvent(kind) {
    var now = Date.now();
    if (now - (S.lastEventAt[kind] || 0) < EVENT_THROTTLE_MS) return;
    S.lastEventAt[kind] = now;
    S.events.push({ t: now, kind: kind });
    S.eventTimes.push(now);
  }

  async function flushEvents(keepalive) {
    if (!S.events.length) return;
    var batch = S.events.splice(0, 2000);
    var path = "/api/cases/" + CASE_ID + "/events";
    try {
      if (keepalive) {
        fetch(path, { method: "POST", keepalive: true, credentials: "same-origin",
                      headers: { "Content-Type": "application/json", "X-CSRF-Token": HL.csrf() },
                      body: JSON.stringify({ events: batch }) });
      } else {
        await HL.api("POST", path, { events: batch });
      }
    } catch (e) {
      S.events = batch.concat(S.events);  // try again with the next flush
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Loading
  async function fetchBinary(path) {
    var rsp = await fetch(path, { credentials: "same-origin" });
    if (rsp.status === 401) { window.location.assign("/login?next=" + encodeURIComponent(location.pathname)); }
    if (!rsp.ok) throw new Error(path + ": HTTP " + rsp.status);
    return rsp.arrayBuffer();
  }

  function nextSlab() {
    var best = -1, bestDist = Infinity, slab = S.meta.slab, k = S.cur.k;
    for (var n = 0; n < S.slabsTotal; n++) {
      if (S.slabState[n] !== 0) continue;
      var mid = n * slab + slab / 2, d = Math.abs(mid - k);
      if (d < bestDist) { bestDist = d; best = n; }
    }
    return best;
  }

  async function slabWorker() {
    for (;;) {
      var n = nextSlab();
      if (n < 0) return;
      S.slabState[n] = 1;
      var buf = await fetchBinary("/api/cases/" + CASE_ID + "/ct/" + n);
      var k0 = n * S.meta.slab, k1 = Math.min(k0 + S.meta.slab, S.K);
      S.ct.set(new Int16Array(buf), k0 * S.JI);
      for (var k = k0; k < k1; k++) { if (!S.loaded[k]) { S.loaded[k] = 1; S.nLoadedSlices++; } }
      S.slabState[n] = 2;
      S.slabsDone++;
      if (S.cur.k >= k0 && S.cur.k < k1) markImage(["axial"]);
      markImage(["sagittal", "coronal"]);
    }
  }

  async function loadPrediction() {
    if (!S.meta.prediction) { S.pred = null; return; }
    S.predPending = true;
    schedule();
    try {
      var buf = await fetchBinary("/api/cases/" + CASE_ID + "/prediction");
      S.pred = HLV.unpackPrediction(buf, S.meta.prediction.box, S.meta.shape);
    } finally {
      S.predPending = false;
      markImage();
    }
  }

  async function loadDose() {
    if (!S.meta.dose || S.dose || S.doseLoading) return;
    S.doseLoading = true;
    var dose = new Uint8Array(S.N), next = 0;
    async function worker() {
      for (;;) {
        var n = next++;
        if (n >= S.slabsTotal) return;
        var buf = await fetchBinary("/api/cases/" + CASE_ID + "/dose/" + n);
        dose.set(new Uint8Array(buf), n * S.meta.slab * S.JI);
      }
    }
    try {
      await Promise.all([worker(), worker(), worker()]);  // the server answers once the dose is ready
      S.dose = dose;
      if (S.meta.dose.pending) {  // the scale (Gy per unit) is known now
        var m = await HL.api("GET", "/api/cases/" + CASE_ID + "?refresh=1");
        S.meta.dose = m.dose;
      }
      markImage();
    } catch (e) {
      HL.toast("Dose: " + e.message, "error");
    } finally {
      S.doseLoading = false;
    }
  }

  async function load() {
    var m = await HL.api("GET", "/api/cases/" + CASE_ID);
    S.meta = m;
    S.K = m.shape[0]; S.J = m.shape[1]; S.I = m.shape[2];
    S.JI = S.J * S.I; S.N = S.K * S.JI;
    S.ct = new Int16Array(S.N);
    S.labels = new Uint8Array(S.N);
    S.loaded = new Uint8Array(S.K);
    S.slabsTotal = m.n_slabs;
    S.slabState = new Uint8Array(m.n_slabs);
    var hb = m.heart_box;
    S.cur = { k: m.first_slice, j: hb ? (hb[2] + hb[3]) >> 1 : S.J >> 1, i: hb ? (hb[4] + hb[5]) >> 1 : S.I >> 1 };
    setupGeometry();
    setWindow(S.win.width, S.win.level, "mediastinal");
    if (!m.dose) root.querySelector('input[data-toggle="dose"]').disabled = true;
    resize();
    // The first image: one slice, drawn as soon as it arrives.
    var first = fetchBinary("/api/cases/" + CASE_ID + "/ct/slice/" + m.first_slice).then(function (buf) {
      if (!S.loaded[m.first_slice]) {
        S.ct.set(new Int16Array(buf), m.first_slice * S.JI);
        S.loaded[m.first_slice] = 1;
        S.nLoadedSlices++;
      }
      markImage();
    });
    var pred = loadPrediction();
    await first;
    var workers = [];
    for (var n = 0; n < CONCURRENCY; n++) workers.push(slabWorker());
    await Promise.all(workers.concat([pred]));
    S.allLoadedMs = performance.now() - T0;
    logEvent("view");
    markImage();
  }

  // ---------------------------------------------------------------------------------------------
  // Save & next
  async function save() {
    if (S.saving || !canSave()) return;
    S.saving = true;
    schedule();
    try {
      logEvent("save");
      await flushEvents(false);
      var body = {
        foreground: HLV.rle(S.labels, 1),
        background: HLV.rle(S.labels, 2),
        kind: "sparse",
        active_seconds: HLV.activeSeconds(S.eventTimes, 20),
        box: S.boxApplied
      };
      var res = await HL.api("POST", "/api/cases/" + CASE_ID + "/correction", body);
      S.lastSave = { response: res, fgRuns: body.foreground.length / 2, bgRuns: body.background.length / 2 };
      HL.toast("Saved", "ok");
      window.location.assign(res.next_case_id ? "/cases/" + res.next_case_id : "/");
    } catch (e) {
      S.saving = false;
      S.error = e.message;
      HL.toast("Not saved: " + e.message, "error");
      schedule();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Debug/test surface
  window.heartloopViewer = {
    state: S,
    views: views,
    get ready() { return !!S.meta && S.slabsDone === S.slabsTotal && !S.predPending; },
    counts: function () { return { fg: S.counts.fg, bg: S.counts.bg }; },
    painted: function (value) {
      var out = [];
      for (var x = 0; x < S.N; x++) if (S.labels[x] === value) out.push(x);
      return out;
    },
    /* Client coordinates -> continuous image coordinates and the voxel under them. */
    probe: function (viewName, clientX, clientY) {
      var v = views[viewName], img = toImage(v, clientX, clientY);
      return { u: img.u, v: img.v, voxel: voxelAt(v, Math.floor(img.u), Math.floor(img.v)),
               brush_mm: brushMm(), sx: v.sx, sy: v.sy };
    },
    timings: function () {
      return { firstImageMs: S.firstImageMs, firstImageSinceScriptMs: S.firstImageSinceScriptMs,
               allLoadedMs: S.allLoadedMs };
    },
    flushEvents: function () { return flushEvents(false); }
  };

  bindControls();
  setTool("fg");
  setBrush(S.brush);
  setInterval(function () { flushEvents(false); }, EVENT_FLUSH_MS);
  load().catch(function (e) {
    S.error = e.message;
    HL.toast("Could not open case " + CASE_ID + ": " + e.message, "error");
  });
})();
