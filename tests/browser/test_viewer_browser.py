"""Acceptance in real headless Chromium, Phase A: the review UI served by waitress on a loopback
port with a small real `UiServices` over phantom patients. A reviewer logs in through the form,
opens the next case from the worklist, scrolls, changes the window, paints a foreground and a
background stroke, undoes the background one and saves; the correction the server received is
exactly the remaining stroke. The next (cold start) case opens and is contoured the same way."""

from __future__ import annotations

import time

import numpy as np
import pytest

from heartloop.core import CaseState
from heartloop.dose.resample import dose_on_grid
from heartloop.phantom import make_patient
from heartloop.review_ui import create_app
from heartloop.review_ui.security import hash_password
from tests.browser.reviewer import login, mask_indices, open_next_from_worklist, review_current_case
from tests.helpers.viewer import PhantomServices, WaitressThread

PASSWORD = "correct horse battery"


@pytest.fixture
def served(sqlite_store, make_settings):
    patient = make_patient(5, rows=192, n_slices=64)
    cold = make_patient(6, rows=160, n_slices=48)
    svc = PhantomServices(sqlite_store)
    predicted = np.roll(patient.heart_mask, 4, axis=2)
    first = svc.add(patient.volume, prediction=predicted, dose=dose_on_grid(patient.dose, patient.volume))
    second = svc.add(cold.volume)
    sqlite_store.add_user("hopper", hash_password(PASSWORD), "reviewer", "Hopper^Grace")
    app = create_app(make_settings(), sqlite_store, svc.ui_services())
    server = WaitressThread(app)
    yield server.url, svc, sqlite_store, (first, second)
    server.close()


def test_reviewer_corrects_two_cases_in_chromium(chrome, served, screenshots):
    base, svc, store, (first, second) = served
    t0 = time.monotonic()
    login(chrome, base, "hopper", PASSWORD)
    assert open_next_from_worklist(chrome) == first
    review = review_current_case(chrome, shots=screenshots, prefix="viewer_")
    assert review.next_url.endswith(f"/cases/{second}")
    assert review.first_image_ms < 1000, review.first_image_ms

    (saved,) = svc.corrections
    assert saved.case_id == first and saved.kind == "sparse"
    assert saved.username == "hopper" and saved.person_name == "Hopper^Grace"
    assert mask_indices(saved.foreground) == review.foreground  # exactly the painted stroke
    assert not saved.background.any()  # the background stroke was undone
    kinds = {e.kind for e in store.interactions(first, "hopper")}
    assert {"paint", "undo", "scroll", "window"} <= kinds, kinds
    assert saved.active_seconds is not None and saved.active_seconds > 0
    assert store.get_case(first).state == CaseState.CORRECTED.value

    # Cold start: no prediction, same tools; saving the last case goes back to the worklist.
    cold = review_current_case(chrome, shots=screenshots, prefix="viewer_cold_")
    assert cold.meta["prediction"] is None and cold.meta["state"] == "NO_MODEL"
    assert cold.next_url.rstrip("/") == base
    assert mask_indices(svc.corrections[-1].foreground) == cold.foreground
    assert time.monotonic() - t0 < 60
