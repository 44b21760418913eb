/* HeartLoop viewer — data helpers without the DOM, exported as the global `HLV`.
 *
 * HLV.PRESETS                      window presets {name: {width, level}} (mediastinal −125…250 HU)
 * HLV.grayLut(width, level)        Uint8Array(65536): HU + 32768 -> grey 0..255
 * HLV.blendTable()                 Uint32Array(6*256) RGBA pixels for (overlay code, grey)
 *                                  code = prediction(1) + 2*label (label 1 foreground, 2 background)
 * HLV.unpackPrediction(buf, box, shape) -> Uint8Array(K*J*I) from np.packbits (big bit order)
 * HLV.rle(labels, value)           runs [start, length, ...] of labels === value (C-order flat index)
 * HLV.History(maxStrokes, maxVoxels) undo/redo of paint strokes as per-stroke diffs
 * HLV.zRows(offsets)               rows of the sagittal/coronal images placed by the real slice offsets
 * HLV.activeSeconds(msTimes, gapS) sum of gaps between events, gaps over gapS excluded
 */
(function () {
  "use strict";

  var PRESETS = {
    mediastinal: { width: 375, level: 62.5 },   // −125 … 250 HU
    lung: { width: 1500, level: -600 },
    bone: { width: 2000, level: 300 }
  };

  function grayLut(width, level) {
    var lut = new Uint8Array(65536);
    var lo = level - width / 2;
    var scale = 255 / Math.max(width, 1);
    for (var n = 0; n < 65536; n++) {
      var g = (n - 32768 - lo) * scale;
      lut[n] = g <= 0 ? 0 : g >= 255 ? 255 : (g + 0.5) | 0;
    }
    return lut;
  }

  // Overlay colours: prediction blue, foreground red, background green (RootPainter3D).
  var PRED = [30, 120, 255, 0.42];
  var FG = [255, 40, 40, 0.55];
  var BG = [40, 215, 70, 0.55];

  function rgba(r, g, b) {
    return (0xff000000 | (b << 16) | (g << 8) | r) >>> 0;  // little-endian ImageData word
  }

  function mix(c, over) {
    var a = over[3];
    return [c[0] * (1 - a) + over[0] * a, c[1] * (1 - a) + over[1] * a, c[2] * (1 - a) + over[2] * a];
  }

  function blendTable() {
    var table = new Uint32Array(6 * 256);
    for (var code = 0; code < 6; code++) {
      for (var g = 0; g < 256; g++) {
        var c = [g, g, g];
        if (code & 1) c = mix(c, PRED);
        var label = code >> 1;
        if (label === 1) c = mix(c, FG);
        else if (label === 2) c = mix(c, BG);
        table[code * 256 + g] = rgba(Math.round(c[0]), Math.round(c[1]), Math.round(c[2]));
      }
    }
    return table;
  }

  /* A dose colour wash: 256 [r, g, b, alpha] (null below 10 % of the maximum). Warm colours only,
   * so it never reads as the blue prediction or the red/green paint: dark orange -> yellow -> white,
   * more opaque with dose. */
  function doseColours() {
    var out = new Array(256);
    for (var v = 0; v < 256; v++) {
      var x = v / 255;
      out[v] = v < 26 ? null : [255, 90 + 165 * x, 40 + 200 * Math.max(0, x - 0.6) / 0.4, 0.12 + 0.4 * x];
    }
    return out;
  }

  function unpackPrediction(buf, box, shape) {
    var K = shape[0], J = shape[1], I = shape[2];
    var out = new Uint8Array(K * J * I);
    var bytes = new Uint8Array(buf);
    var k0 = box[0], k1 = box[1], j0 = box[2], j1 = box[3], i0 = box[4], i1 = box[5];
    var t = 0;
    for (var k = k0; k < k1; k++) {
      for (var j = j0; j < j1; j++) {
        var base = (k * J + j) * I;
        for (var i = i0; i < i1; i++, t++) {
          if ((bytes[t >> 3] >> (7 - (t & 7))) & 1) out[base + i] = 1;
        }
      }
    }
    return out;
  }

  function rle(labels, value) {
    var runs = [];
    var n = labels.length;
    var start = -1;
    for (var x = 0; x < n; x++) {
      if (labels[x] === value) {
        if (start < 0) start = x;
      } else if (start >= 0) {
        runs.push(start, x - start);
        start = -1;
      }
    }
    if (start >= 0) runs.push(start, n - start);
    return runs;
  }

  /* Undo/redo as per-stroke diffs: the flat indices a stroke changed and their previous values.
   * Memory is bounded by a number of strokes and a number of stored voxels (oldest dropped). */
  function History(maxStrokes, maxVoxels) {
    this.maxStrokes = maxStrokes || 100;
    this.maxVoxels = maxVoxels || 16000000;
    this.done = [];
    this.undone = [];
    this.voxels = 0;
    this.open = null;
  }
  History.prototype.begin = function (value) {
    this.open = { value: value, idx: [], prev: [] };
  };
  History.prototype.record = function (idx, prev) {
    this.open.idx.push(idx);
    this.open.prev.push(prev);
  };
  History.prototype.end = function () {
    var s = this.open;
    this.open = null;
    if (!s || !s.idx.length) return null;
    var stroke = { value: s.value, idx: Int32Array.from(s.idx), prev: Uint8Array.from(s.prev) };
    this.done.push(stroke);
    this.voxels += stroke.idx.length;
    this.undone = [];
    while (this.done.length > this.maxStrokes || (this.voxels > this.maxVoxels && this.done.length > 1)) {
      this.voxels -= this.done.shift().idx.length;
    }
    return stroke;
  };
  History.prototype.undo = function (labels) {
    var s = this.done.pop();
    if (!s) return null;
    for (var n = s.idx.length - 1; n >= 0; n--) labels[s.idx[n]] = s.prev[n];
    this.voxels -= s.idx.length;
    this.undone.push(s);
    return s;
  };
  History.prototype.redo = function (labels) {
    var s = this.undone.pop();
    if (!s) return null;
    for (var n = 0; n < s.idx.length; n++) labels[s.idx[n]] = s.value;
    this.done.push(s);
    this.voxels += s.idx.length;
    return s;
  };

  /* Sagittal/coronal rows: slices are placed at their real offsets (uneven spacing is shown as it
   * is), sampled every `dz` mm = the smallest gap (at most 4 rows per slice); the last slice is the
   * top row. rowToK[r] is the nearest slice of row r; kToRow[k] the row of slice k's centre. */
  function zRows(offsets) {
    var K = offsets.length;
    if (K < 2) return { R: 1, dz: 1, rowToK: new Int32Array([0]), kToRow: new Float64Array([0]) };
    var extent = offsets[K - 1] - offsets[0];
    var minGap = Infinity;
    for (var k = 1; k < K; k++) minGap = Math.min(minGap, offsets[k] - offsets[k - 1]);
    var R = Math.min(Math.round(extent / minGap) + 1, 4 * K);
    var dz = extent / (R - 1);
    var rowToK = new Int32Array(R);
    var kk = K - 1;
    for (var r = 0; r < R; r++) {
      var z = offsets[K - 1] - r * dz;
      while (kk > 0 && Math.abs(offsets[kk - 1] - z) <= Math.abs(offsets[kk] - z)) kk--;
      rowToK[r] = kk;
    }
    var kToRow = new Float64Array(K);
    for (var k2 = 0; k2 < K; k2++) kToRow[k2] = (offsets[K - 1] - offsets[k2]) / dz;
    return { R: R, dz: dz, rowToK: rowToK, kToRow: kToRow };
  }

  function activeSeconds(msTimes, gapS) {
    var t = msTimes.slice().sort(function (a, b) { return a - b; });
    var total = 0;
    for (var n = 1; n < t.length; n++) {
      var d = (t[n] - t[n - 1]) / 1000;
      if (d <= (gapS || 20)) total += d;
    }
    return total;
  }

  window.HLV = {
    PRESETS: PRESETS, grayLut: grayLut, blendTable: blendTable, doseColours: doseColours, rgba: rgba,
    unpackPrediction: unpackPrediction, rle: rle, History: History, zRows: zRows, activeSeconds: activeSeconds
  };
})();
