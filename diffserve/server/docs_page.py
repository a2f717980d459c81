"""`GET /docs`: the API reference as one self-contained HTML page, rendered on the server from the OpenAPI
document (`GET /openapi.json`).

FastAPI's interactive pages (Swagger UI, ReDoc) load their JavaScript and CSS from a CDN, which leaves a blank
page for a server used offline, and no installed package here ships those assets; so the page is plain HTML
without scripts or external links: every route with its summary, parameters and request body fields.
"""

from __future__ import annotations

from html import escape
from typing import Any

_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
          "code{background:#f3f3f3;padding:0 .2em}h2{margin-top:1.6em;font-size:1.1em}"
          "table{border-collapse:collapse}td{padding:.1em .8em .1em 0;vertical-align:top}")


def _body_fields(schema: dict[str, Any], operation: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, description) of each field of an operation's JSON request body (resolving one $ref), by name."""
    content = operation.get("requestBody", {}).get("content", {})
    body = next(iter(content.values()), {}).get("schema", {})
    ref = body.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        body = schema.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
    return sorted((name, prop.get("description", "")) for name, prop in body.get("properties", {}).items())


def render_docs(schema: dict[str, Any]) -> str:
    """The reference page for OpenAPI document `schema`."""
    info = schema.get("info", {})
    title = escape(info.get("title", "API"))
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style></head>"
    summary = escape(info.get("summary", ""))
    parts = [head, "<body>", f"<h1>{title} {escape(str(info.get('version', '')))}</h1>",
             f"<p>{summary}. Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(f"<h2><code>{escape(method.upper())} {escape(path)}</code></h2>")
            text = op.get("description") or op.get("summary") or ""
            if text:
                parts.append(f"<p>{escape(text).replace(chr(10) + chr(10), '<br><br>')}</p>")
            rows = [f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p.get('in', ''))}</td>"
                    f"<td>{'required' if p.get('required') else 'optional'}</td></tr>"
                    for p in op.get("parameters", [])]
            rows += [f"<tr><td><code>{escape(name)}</code></td><td>body</td><td>{escape(text)}</td></tr>"
                     for name, text in _body_fields(schema, op)]
            if rows:
                parts.append("<table>" + "".join(rows) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
