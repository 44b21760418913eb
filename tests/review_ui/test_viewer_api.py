"""Viewer data and correction endpoints (docs/review-api.md), on a real app with a small real
`UiServices` over phantom patients: exact bytes, packed prediction, RLE validation, what reaches
`save_correction`, 401/404/409, the once-only cached load and the audit trail."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from heartloop.core import CaseState, Volume
from heartloop.phantom import make_patient
from heartloop.review_ui.viewer import decode_rle, encode_rle, volume_cache
from heartloop.review_ui.volumes import SLAB
from tests.helpers.viewer import PhantomServices, insert_case
from tests.review_ui.conftest import Client


@pytest.fixture(scope="module")
def patient():
    return make_patient(3, rows=64, n_slices=40)


def _dose_on_ct(volume: Volume) -> Volume:
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in volume.shape), indexing="ij")
    gy = 50.0 * np.exp(-((j - 32) ** 2 + (i - 40) ** 2) / 400.0) * (k / volume.shape[0] + 0.5)
    return Volume(gy, volume.origin, volume.row_direction, volume.column_direction, volume.pixel_spacing,
                  volume.slice_offsets, volume.frame_of_reference_uid)


@pytest.fixture
def viewer_env(sqlite_store, ui_app_factory, patient):
    svc = PhantomServices(sqlite_store)
    predicted = np.roll(patient.heart_mask, 2, axis=2)
    ids = {
        "predicted": svc.add(patient.volume, prediction=predicted, dose=_dose_on_ct(patient.volume)),
        "cold": svc.add(patient.volume),
    }
    app = ui_app_factory(svc.ui_services())
    return app, svc, ids, predicted


def test_case_meta_and_exact_ct_bytes(viewer_env, client_for, patient, sqlite_store):
    app, svc, ids, predicted = viewer_env
    c = client_for(app)
    cid = ids["predicted"]
    meta = c.get(f"/api/cases/{cid}").get_json()
    vol = patient.volume
    K, J, I = vol.shape
    assert meta["id"] == cid and meta["state"] == "PREDICTED"
    assert meta["shape"] == [K, J, I] and meta["slab"] == SLAB and meta["n_slabs"] == -(-K // SLAB)
    assert meta["spacing_mm"] == pytest.approx([vol.slice_spacing, *vol.pixel_spacing])
    assert meta["slice_offsets_mm"] == pytest.approx(list(vol.slice_offsets))
    assert meta["hu_min"] == int(vol.array.min()) and meta["hu_max"] == int(vol.array.max())
    k0, k1 = np.flatnonzero(predicted.any(axis=(1, 2)))[[0, -1]]
    assert meta["heart_box"][:2] == [k0, k1 + 1]
    assert meta["first_slice"] == (k0 + k1 + 1) // 2
    assert meta["prediction"]["model_version"] == "000001"
    assert meta["next_case_id"] == ids["cold"]

    for n in range(meta["n_slabs"]):
        rsp = c.get(f"/api/cases/{cid}/ct/{n}")
        assert rsp.status_code == 200 and rsp.mimetype == "application/octet-stream"
        a, b = n * SLAB, min((n + 1) * SLAB, K)
        assert rsp.data == vol.array[a:b].astype("<i2").tobytes()
        assert "private" in rsp.headers["Cache-Control"] and rsp.headers["ETag"]
    last = c.get(f"/api/cases/{cid}/ct/{meta['n_slabs'] - 1}")
    assert c.get(f"/api/cases/{cid}/ct/{meta['n_slabs'] - 1}",
                 headers={"If-None-Match": last.headers["ETag"]}).status_code == 304
    assert c.get(f"/api/cases/{cid}/ct/{meta['n_slabs']}").status_code == 404
    rsp = c.get(f"/api/cases/{cid}/ct/slice/{meta['first_slice']}")
    assert rsp.data == vol.array[meta["first_slice"]].astype("<i2").tobytes()
    assert c.get(f"/api/cases/{cid}/ct/slice/{K}").status_code == 404
    # One audit entry per open, none for a refresh poll.
    c.get(f"/api/cases/{cid}?refresh=1")
    views = [e for e in sqlite_store.audit_entries(action="view_case") if e.target == f"case:{cid}"]
    assert len(views) == 1


def test_prediction_box_and_packbits_round_trip(viewer_env, client_for):
    app, svc, ids, predicted = viewer_env
    c = client_for(app)
    cid = ids["predicted"]
    box = c.get(f"/api/cases/{cid}").get_json()["prediction"]["box"]
    rsp = c.get(f"/api/cases/{cid}/prediction")
    assert rsp.status_code == 200
    k0, k1, j0, j1, i0, i1 = box
    shape = (k1 - k0, j1 - j0, i1 - i0)
    crop = np.unpackbits(np.frombuffer(rsp.data, np.uint8), count=int(np.prod(shape))).reshape(shape).astype(bool)
    full = np.zeros_like(predicted)
    full[k0:k1, j0:j1, i0:i1] = crop
    assert np.array_equal(full, predicted)
    assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, :, -1].any()  # tight box
    # Cold start: no prediction, no dose.
    assert c.get(f"/api/cases/{ids['cold']}/dose/0").status_code == 404
    meta = c.get(f"/api/cases/{ids['cold']}").get_json()
    assert meta["prediction"] is None and meta["heart_box"] is None and meta["dose"] is None
    assert c.get(f"/api/cases/{ids['cold']}/prediction").status_code == 404


def test_dose_slabs(viewer_env, client_for):
    app, svc, ids, _ = viewer_env
    c = client_for(app)
    cid = ids["predicted"]
    c.get(f"/api/cases/{cid}")
    first = c.get(f"/api/cases/{cid}/dose/0")  # waits for the background preparation
    assert first.status_code == 200
    meta = c.get(f"/api/cases/{cid}").get_json()
    assert meta["dose"]["pending"] is False
    gy = svc.cases[cid].dose.array
    assert meta["dose"]["max_gy"] == pytest.approx(float(gy.max()))
    got = np.concatenate([np.frombuffer(c.get(f"/api/cases/{cid}/dose/{n}").data, np.uint8)
                          for n in range(meta["n_slabs"])]).reshape(gy.shape)
    assert np.abs(got * meta["dose"]["scale"] - gy).max() <= meta["dose"]["scale"] / 2 + 1e-6


def test_anonymous_is_401_and_unknown_case_is_404(viewer_env, client_for):
    app, svc, ids, _ = viewer_env
    anon = Client(app)
    for path in (f"/api/cases/{ids['predicted']}", f"/api/cases/{ids['predicted']}/ct/0",
                 f"/api/cases/{ids['predicted']}/ct/slice/0", f"/api/cases/{ids['predicted']}/prediction"):
        assert anon.get(path).status_code == 401, path
    assert anon.post(f"/api/cases/{ids['predicted']}/correction", json={}).status_code == 401
    assert anon.get(f"/cases/{ids['predicted']}").status_code == 302  # the page redirects to login
    c = client_for(app)
    for path in ("/api/cases/999", "/api/cases/999/ct/0", "/api/cases/999/ct/slice/0", "/api/cases/999/prediction",
                 "/cases/999"):
        assert c.get(path).status_code == 404, path
    assert c.post("/api/cases/999/correction", json={"foreground": [0, 1]}).status_code == 404
    assert c.post("/api/cases/999/events", json={"events": []}).status_code == 404
    page = c.get(f"/cases/{ids['predicted']}")
    assert page.status_code == 200 and b"viewer.js" in page.data


def test_rle_decode_rules():
    assert decode_rle([], 10, "fg").sum() == 0
    assert np.flatnonzero(decode_rle([0, 2, 5, 1, 8, 2], 10, "fg")).tolist() == [0, 1, 5, 8, 9]
    assert np.flatnonzero(decode_rle([2, 3, 5, 1], 10, "fg")).tolist() == [2, 3, 4, 5]  # adjacent runs
    for runs, words in [([1], "odd"), ([1.5, 2], "integers"), ([True, 2], "integers"), ("0,1", "list"),
                        ([3, 0], "at least 1"), ([-1, 2], "outside"), ([9, 2], "outside"),
                        ([5, 1, 2, 1], "ascending"), ([2, 3, 4, 1], "ascending")]:
        with pytest.raises(ValueError, match=words):
            decode_rle(runs, 10, "fg")
    rng = np.random.default_rng(0)
    mask = rng.random((5, 6, 7)) > 0.7
    assert np.array_equal(decode_rle(encode_rle(mask), mask.size, "x").reshape(mask.shape), mask)


def test_correction_reaches_services_voxel_exact(viewer_env, client_for, sqlite_store):
    app, svc, ids, predicted = viewer_env
    c = client_for(app, username="curie")
    sqlite_store.update_user("curie", display_name="Curie^Marie")
    cid = ids["predicted"]
    K, J, I = svc.cases[cid].volume.shape
    fg = np.zeros((K, J, I), bool)
    fg[20, 30:34, 10:15] = True
    fg[21, 30, 10] = True
    bg = np.zeros_like(fg)
    bg[19, 5:8, 50:60] = True
    # Events: 1 s apart, with a 60 s pause that does not count.
    t0 = 1_700_000_000_000
    events = [{"t": t0 + 1000 * n, "kind": "paint"} for n in range(5)] + [{"t": t0 + 64_000, "kind": "paint"}]
    assert c.post(f"/api/cases/{cid}/events", json={"events": events}).get_json() == {"stored": 6}
    rsp = c.post(f"/api/cases/{cid}/correction", json={
        "foreground": encode_rle(fg), "background": encode_rle(bg), "kind": "sparse", "active_seconds": 999.0,
        "box": None})
    assert rsp.status_code == 201, rsp.get_json()
    body = rsp.get_json()
    assert body == {"correction_id": 1, "state": "CORRECTED", "next_case_id": ids["cold"], "active_seconds": 4.0}
    (req,) = svc.corrections
    assert req.case_id == cid and req.kind == "sparse" and req.username == "curie"
    assert req.person_name == "Curie^Marie" and req.active_seconds == pytest.approx(4.0)
    assert req.foreground.shape == (K, J, I) and req.foreground.dtype == bool
    assert np.array_equal(req.foreground, fg) and np.array_equal(req.background, bg)
    actions = [(e.action, e.target) for e in sqlite_store.audit_entries(actor="curie")]
    assert ("save_correction", f"case:{cid}") in actions


def test_correction_without_events_keeps_the_client_time_and_cold_start_dense(viewer_env, client_for):
    app, svc, ids, _ = viewer_env
    c = client_for(app)
    cid = ids["cold"]
    shape = svc.cases[cid].volume.shape
    fg = np.zeros(shape, bool)
    fg[10:12, 20:30, 20:30] = True
    rsp = c.post(f"/api/cases/{cid}/correction", json={"foreground": encode_rle(fg), "background": [],
                                                       "kind": "dense", "active_seconds": 12.5})
    assert rsp.status_code == 201
    assert rsp.get_json()["next_case_id"] == ids["predicted"]
    req = svc.corrections[-1]
    assert req.kind == "dense" and req.active_seconds == 12.5 and req.foreground.sum() == fg.sum()
    assert not req.background.any() and req.person_name == req.username


def test_bad_corrections_are_400_with_reasons_and_409_when_not_correctable(viewer_env, client_for, sqlite_store):
    app, svc, ids, _ = viewer_env
    c = client_for(app)
    cid = ids["predicted"]
    n = int(np.prod(svc.cases[cid].volume.shape))
    cases = [
        ({"foreground": [0, 5], "background": [3, 1]}, "both foreground and background"),
        ({"foreground": [n - 1, 2]}, "outside the volume"),
        ({"foreground": [10, 1, 5, 1]}, "ascending"),
        ({"foreground": ["1", 1]}, "integers"),
        ({"foreground": [], "background": []}, "empty sparse correction"),
        ({"foreground": [0, 1], "kind": "magic"}, "kind"),
        ({"foreground": [0, 1], "active_seconds": "long"}, "active_seconds"),
        ({"foreground": [0, 1], "box": [0, 1, 2]}, "box"),
    ]
    for body, words in cases:
        rsp = c.post(f"/api/cases/{cid}/correction", json=body)
        assert rsp.status_code == 400, (body, rsp.get_json())
        assert words in rsp.get_json()["error"], (body, rsp.get_json())
    assert not svc.corrections
    not_ready = insert_case(sqlite_store, state=CaseState.READY)
    svc.cases[not_ready] = svc.cases[cid]
    rsp = c.post(f"/api/cases/{not_ready}/correction", json={"foreground": [0, 1]})
    assert rsp.status_code == 409 and "READY" in rsp.get_json()["error"]
    # CSRF is required like on every state change.
    assert c.post(f"/api/cases/{cid}/correction", json={"foreground": [0, 1]}, csrf=False).status_code == 403


def test_box_and_events_validation(viewer_env, client_for):
    app, svc, ids, _ = viewer_env
    c = client_for(app)
    cid = ids["predicted"]
    rsp = c.post(f"/api/cases/{cid}/box", json={"box": [5, 30, 10, 50, 10, 50]})
    assert rsp.status_code == 202 and svc.boxes == [(cid, [5, 30, 10, 50, 10, 50])]
    assert c.post(f"/api/cases/{cid}/box", json={"box": None}).status_code == 202
    assert svc.boxes[-1] == (cid, None)
    rsp = c.post(f"/api/cases/{cid}/box", json={"box": [5, 5, 10, 50, 10, 50]})
    assert rsp.status_code == 400 and "empty" in rsp.get_json()["error"]
    assert c.post(f"/api/cases/{cid}/box", json={"box": [0, 1, 0, 1, 0, 999]}).status_code == 400
    too_many = [{"t": 1, "kind": "scroll"}] * 2001
    assert c.post(f"/api/cases/{cid}/events", json={"events": too_many}).status_code == 400
    assert c.post(f"/api/cases/{cid}/events", json={"events": [{"t": "x", "kind": "a"}]}).status_code == 400
    assert c.post(f"/api/cases/{cid}/events", json={"nope": 1}).status_code == 400


def test_concurrent_first_requests_load_the_case_once(sqlite_store, ui_app_factory, client_for, patient):
    svc = PhantomServices(sqlite_store, load_delay_s=0.3)
    cid = svc.add(patient.volume)
    app = ui_app_factory(svc.ui_services())
    c = client_for(app)
    c.get("/api/session")
    statuses: list[int] = []

    def fetch(n: int) -> None:
        statuses.append(c.get(f"/api/cases/{cid}/ct/{n % 5}").status_code)

    threads = [threading.Thread(target=fetch, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert statuses == [200] * 6
    assert svc.volume_loads == [cid]
    with app.app_context():
        assert volume_cache().loads == 1


def test_prefetch_warms_the_next_case_and_lru_evicts(sqlite_store, ui_app_factory, client_for, patient):
    svc = PhantomServices(sqlite_store)
    a = svc.add(patient.volume)
    b = svc.add(patient.volume)
    app = ui_app_factory(svc.ui_services())
    c = client_for(app)
    assert c.get(f"/api/cases/{a}").get_json()["next_case_id"] == b
    with app.app_context():
        cache = volume_cache()
        for _ in range(100):  # the prefetch thread loads case b
            if cache.peek(b) is not None:
                break
            threading.Event().wait(0.02)
        assert cache.peek(b) is not None
        assert sorted(svc.volume_loads) == [a, b]
        cache.max_cases = 1
        cache._evict()
        assert cache.peek(a) is None and cache.peek(b) is not None


def test_a_case_reassembled_with_more_slices_is_read_afresh(sqlite_store, ui_app_factory, client_for, patient):
    """Slices that arrive after a case was opened (the case is assembled again) are not hidden by
    the viewer's cache: the next open reads the new CT."""
    from heartloop.store.models import Case

    svc = PhantomServices(sqlite_store)
    short = patient.volume
    cid = svc.add(Volume(short.array[:30], short.origin, short.row_direction, short.column_direction,
                         short.pixel_spacing, short.slice_offsets[:30], short.frame_of_reference_uid))
    with sqlite_store.session() as s, s.begin():  # the case's row says 30 slices, like its CT
        s.get(Case, cid).n_slices = 30
    app = ui_app_factory(svc.ui_services())
    c = client_for(app)
    assert c.get(f"/api/cases/{cid}").get_json()["shape"][0] == 30
    svc.cases[cid].volume = short  # the rest of the series arrived: 40 slices now
    with sqlite_store.session() as s, s.begin():
        s.get(Case, cid).n_slices = short.shape[0]
    meta = c.get(f"/api/cases/{cid}").get_json()
    assert meta["shape"][0] == short.shape[0]
    assert svc.volume_loads == [cid, cid]
    last = meta["n_slabs"] - 1
    assert c.get(f"/api/cases/{cid}/ct/{last}").data == short.array[last * SLAB:].astype("<i2").tobytes()
