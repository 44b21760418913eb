"""The API's own description: ``GET /api/openapi.json`` (public, it holds no data) and the
``/api/docs`` page rendered server-side from it (no CDN, no script)."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, render_template

from heartloop.review_ui.security import login_required

log = logging.getLogger(__name__)

bp = Blueprint("apidocs", __name__)

SPEC_PATH = Path(__file__).with_name("openapi.json")
METHODS = ("get", "post", "put", "patch", "delete")


@functools.lru_cache(maxsize=1)
def spec_text() -> str:
    """The hand-written OpenAPI 3.1 document, as shipped in the package."""
    return SPEC_PATH.read_text(encoding="utf-8")


def spec() -> dict[str, Any]:
    """The OpenAPI document as data."""
    return json.loads(spec_text())


def _resolve(node: Any, doc: dict[str, Any]) -> Any:
    """Follow a local ``$ref`` (one level: enough to show a schema's name and fields)."""
    if isinstance(node, dict) and "$ref" in node:
        target: Any = doc
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return target
    return node


def _schema_label(schema: Any) -> str:
    if not isinstance(schema, dict):
        return ""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "oneOf" in schema:
        return " | ".join(_schema_label(s) for s in schema["oneOf"])
    if "allOf" in schema:
        return " + ".join(_schema_label(s) for s in schema["allOf"])
    typ = schema.get("type", "object")
    if typ == "array":
        return f"array of {_schema_label(schema.get('items', {})) or 'any'}"
    return " | ".join(typ) if isinstance(typ, list) else str(typ)


def operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every operation, flattened for the page (path order as written, methods in HTTP order)."""
    ops = []
    for path, item in doc["paths"].items():
        for method in METHODS:
            o = item.get(method)
            if o is None:
                continue
            security = o.get("security", doc.get("security", []))
            schemes = sorted({name for req in security for name in req})
            body_schema = None
            if "requestBody" in o:
                content = o["requestBody"].get("content", {})
                body_schema = next(iter(content.values()), {}).get("schema")
            responses = []
            for status, rsp in o.get("responses", {}).items():
                rsp = _resolve(rsp, doc)
                content = rsp.get("content", {})
                media, schema = next(iter(content.items()), ("", {}))
                responses.append({"status": status, "description": rsp.get("description", ""), "media": media,
                                  "schema": _schema_label(schema.get("schema") if isinstance(schema, dict) else None)})
            ops.append({
                "method": method, "path": path, "summary": o.get("summary", ""),
                "description": o.get("description", ""), "tag": (o.get("tags") or [""])[0],
                "public": "session" not in schemes, "csrf": "csrf" in schemes,
                "parameters": [{"name": p["name"], "in": p["in"], "required": p.get("required", False),
                                "type": _schema_label(p.get("schema")), "description": p.get("description", "")}
                               for p in o.get("parameters", [])],
                "body": _schema_label(body_schema) if body_schema else None,
                "responses": responses,
            })
    return ops


@bp.get("/api/openapi.json")
def openapi_json() -> Any:
    """The OpenAPI document (public)."""
    return Response(spec_text(), mimetype="application/json")


@bp.get("/api/docs")
@login_required()
def docs_page() -> Any:
    """The API reference for people, rendered from the OpenAPI document."""
    doc = spec()
    schemas = {name: json.dumps(s, indent=2) for name, s in doc["components"]["schemas"].items()}
    return render_template("apidocs.html", info=doc["info"], ops=operations(doc),
                           tags=[t["name"] for t in doc.get("tags", [])], schemas=schemas,
                           security=doc["components"]["securitySchemes"])
