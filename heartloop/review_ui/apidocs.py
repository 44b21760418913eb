"""Placeholder: being written."""

from flask import Blueprint

bp = Blueprint("apidocs", __name__)
