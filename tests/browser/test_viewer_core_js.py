"""The viewer's pure functions (static/js/viewer_core.js) run in real Chromium and agree with the
server's Python on every format both sides speak: RLE of painted voxels, packed predictions,
active time. Undo/redo keeps at least 50 strokes and restores the label volume exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import heartloop.review_ui
from heartloop.review_ui.viewer import decode_rle, encode_rle
from heartloop.store import active_seconds

CORE_JS = Path(heartloop.review_ui.__file__).parent / "static" / "js" / "viewer_core.js"


def _load_core(chrome) -> None:
    chrome.get("data:text/html,<!doctype html><title>core</title>")
    chrome.execute_script(CORE_JS.read_text())
    assert chrome.execute_script("return typeof window.HLV.History") == "function"


def test_rle_and_packed_prediction_agree_with_python(chrome):
    _load_core(chrome)
    rng = np.random.default_rng(3)
    shape = (4, 6, 7)
    labels = rng.integers(0, 3, size=shape).astype(np.uint8)  # 0 none, 1 foreground, 2 background
    runs_js = chrome.execute_script("return HLV.rle(Uint8Array.from(arguments[0]), 1);", labels.ravel().tolist())
    assert runs_js == encode_rle(labels == 1)
    assert (decode_rle(runs_js, labels.size, "foreground").reshape(shape) == (labels == 1)).all()

    mask = rng.random(shape) > 0.6
    box = [1, 3, 2, 5, 1, 6]
    crop = mask[1:3, 2:5, 1:6]
    packed = np.packbits(crop, axis=None).tolist()
    out = chrome.execute_script(
        "return Array.from(HLV.unpackPrediction(Uint8Array.from(arguments[0]).buffer, arguments[1], arguments[2]));",
        packed, box, list(shape))
    expected = np.zeros(shape, dtype=bool)
    expected[1:3, 2:5, 1:6] = crop
    assert (np.array(out, dtype=bool).reshape(shape) == expected).all()


def test_active_time_agrees_with_the_server(chrome):
    _load_core(chrome)
    seconds = [0.0, 2.0, 5.5, 40.0, 41.0, 70.0, 71.5]  # two pauses over 20 s
    js = chrome.execute_script("return HLV.activeSeconds(arguments[0], 20);", [t * 1000 for t in seconds])
    assert abs(js - active_seconds(seconds)) < 1e-9
    assert abs(js - (2.0 + 3.5 + 1.0 + 1.5)) < 1e-9


def test_undo_redo_keeps_at_least_50_strokes_exactly(chrome):
    _load_core(chrome)
    result = chrome.execute_script("""
        var n = 1000, labels = new Uint8Array(n), h = new HLV.History(100, 16000000), states = [];
        for (var s = 0; s < 60; s++) {            // 60 overlapping strokes, alternating fg/bg
          states.push(Array.from(labels));
          var value = 1 + (s % 2);
          h.begin(value);
          for (var x = s * 10; x < s * 10 + 25 && x < n; x++) { h.record(x, labels[x]); labels[x] = value; }
          h.end();
        }
        var final = Array.from(labels), ok = [];
        for (var u = 59; u >= 0; u--) {           // undo all 60, checking each step
          h.undo(labels);
          ok.push(Array.from(labels).join() === states[u].join());
        }
        for (var r = 0; r < 60; r++) h.redo(labels);
        return {ok: ok, redone: Array.from(labels).join() === final.join(), empty: h.undo(new Uint8Array(n)) !== null};
    """)
    assert len(result["ok"]) == 60 and all(result["ok"])
    assert result["redone"]
