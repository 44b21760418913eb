"""A reviewer in real Chromium: log in, open a case, scroll, window, paint, undo, save & next.

Used by the Phase A test (app on waitress with phantom services) and the end-to-end test against
`heartloop serve`. Geometry checks use the viewer's own `window.heartloopViewer.probe` only to map
the *recorded* pointer positions to image coordinates; which voxels a stroke must paint is then
computed here, independently of the viewer's brush code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

RECORD_POINTER = """
const c = document.getElementById('vw-canvas-axial');
window.__hlPointer = [];
for (const type of ['pointerdown', 'pointermove', 'pointerup']) {
  c.addEventListener(type, e => {
    if (type !== 'pointermove' || e.buttons) window.__hlPointer.push([type, e.clientX, e.clientY]);
  }, true);
}
"""


@dataclass
class Stroke:
    value: int  # 1 foreground, 2 background
    path: list[tuple[float, float]]  # image (u, v) = (column, row) of every pointer event of the drag
    radius_px: float
    slice_k: int
    painted: set[int] = field(default_factory=set)


def wait(driver: Any, predicate: Any, timeout: float = 15.0, what: str = "") -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(predicate, message=what)


def login(driver: Any, base_url: str, username: str, password: str) -> None:
    driver.get(base_url + "/login")
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: "/login" not in d.current_url, what="login")


def open_next_from_worklist(driver: Any, timeout: float = 60.0) -> int:
    """Click "Review next case" on the worklist once it points at a case; the case id."""
    wait(driver, lambda d: d.find_element(By.ID, "review-next").get_attribute("aria-disabled") != "true"
         and "/cases/" in (d.find_element(By.ID, "review-next").get_attribute("href") or ""),
         timeout=timeout, what="a reviewable case on the worklist")
    driver.find_element(By.ID, "review-next").click()
    wait(driver, lambda d: "/cases/" in d.current_url, what="viewer page")
    return int(driver.current_url.rstrip("/").rsplit("/", 1)[1])


def wait_viewer_ready(driver: Any, timeout: float = 20.0) -> dict[str, Any]:
    wait(driver, lambda d: d.execute_script(
        "return !!(window.heartloopViewer && heartloopViewer.ready && heartloopViewer.state.firstImageMs !== null)"),
        timeout=timeout, what="viewer loaded")
    return driver.execute_script("return heartloopViewer.state.meta")


def viewer_state(driver: Any, expr: str) -> Any:
    return driver.execute_script(f"return {expr}")


def axial_client_point(driver: Any, meta: dict[str, Any], u: float, v: float) -> tuple[float, float]:
    """Client coordinates of image point (u, v) of the axial view at zoom 1 (the view's fit rule)."""
    left, top, width, height, cw, ch = driver.execute_script(
        "const c = document.getElementById('vw-canvas-axial'), r = c.getBoundingClientRect();"
        "return [r.left, r.top, r.width, r.height, c.width, c.height];")
    K, J, I = meta["shape"]
    dy, dx = meta["spacing_mm"][1], meta["spacing_mm"][2]
    s = min(cw / (I * dx), ch / (J * dy)) * 0.98
    pu, pv = dx * s, dy * s
    x0, y0 = (cw - I * pu) / 2, (ch - J * pv) / 2
    return left + (x0 + u * pu) * width / cw, top + (y0 + v * pv) * height / ch


def drag_on_axial(driver: Any, meta: dict[str, Any], a: tuple[float, float], b: tuple[float, float]) -> list:
    """A real mouse drag between image points `a` and `b`; the recorded pointer positions."""
    canvas = driver.find_element(By.ID, "vw-canvas-axial")
    left, top, width, height = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height];", canvas)
    cx, cy = left + width / 2, top + height / 2
    driver.execute_script("window.__hlPointer = window.__hlPointer || []; window.__hlPointer.length = 0;")
    pa, pb = axial_client_point(driver, meta, *a), axial_client_point(driver, meta, *b)
    (ActionChains(driver)
     .move_to_element_with_offset(canvas, round(pa[0] - cx), round(pa[1] - cy))
     .click_and_hold()
     .move_to_element_with_offset(canvas, round((pa[0] + pb[0]) / 2 - cx), round((pa[1] + pb[1]) / 2 - cy))
     .move_to_element_with_offset(canvas, round(pb[0] - cx), round(pb[1] - cy))
     .release()
     .perform())
    events = driver.execute_script("return window.__hlPointer.slice()")
    kinds = [e[0] for e in events]
    assert kinds[0] == "pointerdown" and kinds[-1] == "pointerup" and len(kinds) >= 3, kinds
    return events


def paint_stroke(driver: Any, meta: dict[str, Any], value: int, a: tuple[float, float],
                 b: tuple[float, float]) -> Stroke:
    """Paint a straight stroke; returns it with the image coordinates the viewer really received."""
    before = set(viewer_state(driver, f"heartloopViewer.painted({value})"))
    events = drag_on_axial(driver, meta, a, b)
    probes = [viewer_state(driver, f"heartloopViewer.probe('axial', {x}, {y})") for _, x, y in events]
    after = set(viewer_state(driver, f"heartloopViewer.painted({value})"))
    return Stroke(value, [(p["u"], p["v"]) for p in probes], probes[0]["brush_mm"] / probes[0]["sx"],
                  viewer_state(driver, "heartloopViewer.state.cur.k"), after - before)


def check_stroke_geometry(stroke: Stroke, shape: tuple[int, int, int]) -> None:
    """The stroke painted every voxel whose centre lies within r − ½ px of the pointer path and none
    beyond r (the viewer stamps discs at most ½ px apart along the path), all on its slice."""
    K, J, I = shape
    assert stroke.painted, "the stroke painted nothing"
    k_of = {idx // (J * I) for idx in stroke.painted}
    assert k_of == {stroke.slice_k}, k_of
    jj, ii = np.mgrid[0:J, 0:I]
    pu, pv = ii + 0.5, jj + 0.5
    dist = np.full(pu.shape, np.inf)
    for (u0, v0), (u1, v1) in zip(stroke.path, stroke.path[1:]):
        du, dv = u1 - u0, v1 - v0
        length2 = du * du + dv * dv
        t = np.clip(((pu - u0) * du + (pv - v0) * dv) / length2, 0, 1) if length2 else np.zeros_like(pu)
        dist = np.minimum(dist, np.hypot(pu - (u0 + t * du), pv - (v0 + t * dv)))
    base = stroke.slice_k * J * I
    must = {base + int(x) for x in np.flatnonzero(dist.ravel() <= stroke.radius_px - 0.5)}
    may = {base + int(x) for x in np.flatnonzero(dist.ravel() <= stroke.radius_px + 1e-6)}
    assert must <= stroke.painted, f"{len(must - stroke.painted)} voxels under the stroke were not painted"
    assert stroke.painted <= may, f"{len(stroke.painted - may)} voxels painted outside the brush"


def screenshot(driver: Any, directory: Path | None, name: str) -> Path | None:
    if directory is None:
        return None
    path = directory / name
    driver.save_screenshot(str(path))
    return path


@dataclass
class Review:
    case_id: int
    meta: dict[str, Any]
    foreground: list[int]
    background: list[int]
    strokes: list[Stroke]
    first_image_ms: float
    next_url: str


def review_current_case(driver: Any, *, shots: Path | None = None, prefix: str = "",
                        cold: bool = False) -> Review:
    """Scroll, window, paint a foreground and a background stroke, undo the background one, save.

    The final correction therefore holds exactly the foreground stroke.
    """
    case_id = int(driver.current_url.rstrip("/").rsplit("/", 1)[1])
    meta = wait_viewer_ready(driver)
    shape = tuple(meta["shape"])
    K, J, I = shape
    timings = viewer_state(driver, "heartloopViewer.timings()")
    driver.execute_script(RECORD_POINTER)
    canvas = driver.find_element(By.ID, "vw-canvas-axial")
    k0 = meta["first_slice"]
    assert viewer_state(driver, "heartloopViewer.state.cur.k") == k0
    screenshot(driver, shots, f"{prefix}01_opened.png")

    # Scroll: wheel up one slice, keys down two, PageUp ten, Home back to the heart's middle.
    ActionChains(driver).move_to_element(canvas).perform()
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -120).perform()
    wait(driver, lambda d: viewer_state(d, "heartloopViewer.state.cur.k") == min(k0 + 1, K - 1), 5, "wheel scroll")
    canvas.send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN)
    assert viewer_state(driver, "heartloopViewer.state.cur.k") == max(min(k0 + 1, K - 1) - 2, 0)
    canvas.send_keys(Keys.PAGE_UP)
    assert viewer_state(driver, "heartloopViewer.state.cur.k") == min(max(min(k0 + 1, K - 1) - 2, 0) + 10, K - 1)
    canvas.send_keys(Keys.HOME)
    assert viewer_state(driver, "heartloopViewer.state.cur.k") == k0

    # Window: lung preset from the menu, then "1" back to mediastinal (W 375, L 62.5).
    Select(driver.find_element(By.ID, "vw-preset")).select_by_value("lung")
    assert viewer_state(driver, "[heartloopViewer.state.win.width, heartloopViewer.state.win.level]") == [1500, -600]
    canvas.send_keys("1")
    assert viewer_state(driver, "[heartloopViewer.state.win.width, heartloopViewer.state.win.level]") == [375, 62.5]

    # Brush radius 3 voxels ("[" from 4), outline on, then a foreground and a background stroke.
    canvas.send_keys("[", "o", "f")
    assert viewer_state(driver, "heartloopViewer.state.brush") == 3
    hb = meta["heart_box"] or [k0, k0 + 1, J // 3, 2 * J // 3, I // 3, 2 * I // 3]
    jc, ic = (hb[2] + hb[3]) / 2, (hb[4] + hb[5]) / 2
    span = max(4.0, (hb[5] - hb[4]) / 3)
    fg = paint_stroke(driver, meta, 1, (ic - span, jc - 2.2), (ic + span, jc + 1.3))
    canvas.send_keys("b")
    bg = paint_stroke(driver, meta, 2, (ic - span, jc + 9.6), (ic + 0.7 * span, jc + 12.4))
    check_stroke_geometry(fg, shape)
    check_stroke_geometry(bg, shape)
    assert not fg.painted & bg.painted, "the strokes were meant not to overlap"
    assert viewer_state(driver, "heartloopViewer.counts()") == {"fg": len(fg.painted), "bg": len(bg.painted)}
    screenshot(driver, shots, f"{prefix}02_painted.png")

    # Undo the background stroke (Ctrl+Z): exactly the foreground stroke remains.
    canvas.send_keys(Keys.CONTROL, "z")
    canvas.send_keys(Keys.NULL)
    assert viewer_state(driver, "heartloopViewer.counts()") == {"fg": len(fg.painted), "bg": 0}
    foreground = viewer_state(driver, "heartloopViewer.painted(1)")
    assert set(foreground) == fg.painted
    background = viewer_state(driver, "heartloopViewer.painted(2)")
    assert background == []
    if meta.get("dose"):
        canvas.send_keys("d")
        wait(driver, lambda d: viewer_state(d, "heartloopViewer.state.dose !== null"), 10, "dose wash")
    screenshot(driver, shots, f"{prefix}03_after_undo.png")

    # Save & next.
    before = driver.current_url
    driver.find_element(By.ID, "vw-save").click()
    wait(driver, lambda d: d.current_url != before, 20, "save & next")
    return Review(case_id, meta, sorted(foreground), background, [fg, bg],
                  float(timings["firstImageSinceScriptMs"]), driver.current_url)


def mask_indices(mask: np.ndarray) -> list[int]:
    return [int(x) for x in np.flatnonzero(np.asarray(mask).reshape(-1))]


__all__ = ["Review", "Stroke", "check_stroke_geometry", "login", "mask_indices", "open_next_from_worklist",
           "review_current_case", "screenshot", "time", "wait", "wait_viewer_ready", "math"]
