"""The review UI: Flask app (auth, worklist, viewer, corrections, dashboards, audit, JSON API)."""

from heartloop.review_ui.app import create_app
from heartloop.review_ui.services import CorrectionRequest, UiServices

__all__ = ["CorrectionRequest", "UiServices", "create_app"]
