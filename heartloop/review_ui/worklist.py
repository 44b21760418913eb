"""Placeholder: being written."""

from flask import Blueprint, redirect, url_for, g

bp = Blueprint("worklist", __name__)


@bp.get("/")
def index():  # type: ignore[no-untyped-def]
    if g.user is None:
        return redirect(url_for("auth.login_page"))
    return "worklist"
