"""Placeholder: being written."""

from flask import Blueprint

bp = Blueprint("viewer", __name__)
