"""The ``/docs`` page of txagg's HTTP APIs (the mock upstream and ``txagg serve``).

Rendered from the OpenAPI document itself, so the page and ``/openapi.json`` cannot disagree,
and self-contained (no CDN): it must work on a machine without internet access.
"""

from __future__ import annotations

import html
import json


def _operation_html(path: str, method: str, operation: dict, shared: list) -> str:
    rows = "".join(
        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            *(
                html.escape(str(value))
                for value in (
                    parameter["name"],
                    parameter["in"],
                    json.dumps(parameter["schema"]),
                    parameter.get("description", ""),
                )
            )
        )
        for parameter in shared + operation.get("parameters", [])
    )
    table = (
        "<table><tr><th>parameter</th><th>in</th><th>schema</th><th>description</th></tr>"
        f"{rows}</table>"
        if rows
        else ""
    )
    responses = ", ".join(
        f"<code>{code}</code> {html.escape(response['description'])}"
        for code, response in operation["responses"].items()
    )
    description = operation.get("description", "")
    return (
        f"<section><h2><span class=m>{method.upper()}</span> <code>{html.escape(path)}</code></h2>"
        f"<p>{html.escape(operation['summary'])}</p>"
        + (f"<p>{html.escape(description)}</p>" if description else "")
        + table
        + f"<p>Responses: {responses}</p></section>"
    )


def docs_html(document: dict) -> str:
    """A self-contained page (no CDN: it must work offline) rendered from the document."""
    sections = []
    for path, item in document["paths"].items():
        shared = item.get("parameters", [])
        for method, operation in item.items():
            if method != "parameters":
                sections.append(_operation_html(path, method, operation, shared))
    schemas = "".join(
        f"<h3>{html.escape(name)}</h3><pre>{html.escape(json.dumps(schema, indent=2))}</pre>"
        for name, schema in document["components"]["schemas"].items()
    )
    info = document["info"]
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:left}.m{background:#2a6;color:#fff;padding:0 .4em;border-radius:3px}"
        "pre{background:#f6f6f6;padding:.6em;overflow:auto}"
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(info['title'])}</title><style>{style}</style></head><body>"
        f"<h1>{html.escape(info['title'])} {html.escape(info['version'])}</h1>"
        f"<p>{html.escape(info['description'])}</p>"
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1)</p>'
        + "".join(sections)
        + f"<h2>Schemas</h2>{schemas}</body></html>"
    )
