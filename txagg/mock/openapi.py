"""The OpenAPI 3.1 document of the mock's routes (``/openapi.json``, and ``/docs`` from it).

The routes, answers and headers are written here; the bodies' schemas and the query parameters
are generated from the shapes in ``txagg.shapes`` when the document is built.
"""

from __future__ import annotations

from .. import __version__
from ..httpserve import PROBLEM_TYPE, docs_redirect_doc
from .config import MockConfig
from .faults import Faults


# Not httpserve.problem_response_doc: the mock's headers are $refs to its components.
def _problem_response(description: str, extra_headers: tuple[str, ...] = ()) -> dict:
    response = {
        "description": description,
        "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if extra_headers:
        response["headers"] = {
            name: {"$ref": f"#/components/headers/{name}"} for name in extra_headers
        }
    return response


RATE_HEADERS = ("RateLimit-Policy", "RateLimit")


def _transactions_operation(config: MockConfig, parameters: list[dict]) -> dict:
    rate_headers = {name: {"$ref": f"#/components/headers/{name}"} for name in RATE_HEADERS}
    faults = config.fault_settings
    page_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Page"}}}
    if faults.nonjson:
        page_content["text/html"] = {"schema": {"type": "string"}}
    return {
        "summary": "Transactions with startDate <= createdAt <= endDate, in createdAt order",
        "description": (
            f"Rate limited: {config.rate_limit} requests per {config.real_per:g} seconds (token "
            f"bucket{_time_scale_note(config)}). Broken records may be mixed in; meta counts "
            "every record on the pages. "
            f"Injected faults (--faults): {faults.spec() or 'none'}; counted at GET /faults."
        ),
        "operationId": "listTransactions",
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "One page of the window",
                "headers": rate_headers,
                "content": page_content,
            },
            "400": _problem_response("A parameter is malformed", RATE_HEADERS),
            "429": _problem_response(
                "Over the rate limit: wait Retry-After", (*RATE_HEADERS, "Retry-After")
            ),
            **_fault_responses(faults),
        },
    }


def _time_scale_note(config: MockConfig) -> str:
    if config.time_scale == 1:
        return ""
    return f"; --per {config.per:g} at --time-scale {config.time_scale:g}"


def _fault_responses(faults: Faults) -> dict:
    """The 5xx answers that --faults error=P adds (only then: without faults there are none)."""
    if not faults.error:
        return {}
    return {
        str(status): _problem_response(f"Injected fault (--faults error): {status}", RATE_HEADERS)
        for status in (500, 502, 503)
    }


def _get(summary: str, operation_id: str, schema_ref: str, **extra) -> dict:
    return {
        "get": {
            "summary": summary,
            "operationId": operation_id,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{schema_ref}"}
                        }
                    },
                },
                **extra,
            },
        }
    }


def _components(schemas: dict) -> dict:
    return {
        "schemas": schemas,
        "headers": {
            "RateLimit-Policy": {
                "description": 'The quota: "default";q=<requests>;w=<window seconds>',
                "schema": {"type": "string"},
            },
            "RateLimit": {
                "description": 'The budget left: "default";r=<requests>;t=<seconds until full>',
                "schema": {"type": "string"},
            },
            "Retry-After": {
                "description": (
                    "When a request is allowed again: whole seconds, or an HTTP-date "
                    "(--faults throttle alternates the two)"
                ),
                "schema": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}]},
            },
        },
    }


def openapi_document(config: MockConfig) -> dict:
    """The OpenAPI 3.1 description of every route this mock serves."""
    # pydantic is imported here, when the mock builds its document: never by ``import
    # txagg.mock``, never on a request path.
    from ..shapes import (
        FaultReport,
        Page,
        PageMeta,
        Payout,
        PayoutList,
        Problem,
        Transaction,
        TransactionsParameters,
        UserList,
        UserReport,
        openapi_schemas,
        query_parameters,
    )

    not_found = _problem_response("No transaction of this user is visible yet")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "txagg mock Transaction API",
            "version": __version__,
            "description": (
                "A deterministic fake of the upstream Transaction API, with its own ground truth. "
                "Errors are application/problem+json: 404 for unknown routes, 405 for other "
                "methods than GET. Started with --faults (txagg mock-serve --faults "
                "error=0.1,truncate=0.05,slow=0.02:3,...; see docs/mock.md) it injects upstream "
                "faults into /transactions, deterministically under --seed; GET /faults shows "
                f"the settings and counts what was injected. Active: "
                f"{config.fault_settings.spec() or 'none'}."
            ),
        },
        "paths": {
            "/transactions": {
                "get": _transactions_operation(config, query_parameters(TransactionsParameters))
            },
            "/users": _get("Every user's true aggregates, by userId", "listUsers", "UserList"),
            "/users/{userId}": {
                **_get("One user's true aggregates", "getUser", "UserReport", **{"404": not_found}),
                "parameters": [
                    {"name": "userId", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            },
            "/payouts": _get(
                "Requested payouts per user (users with none left out)", "listPayouts", "PayoutList"
            ),
            "/faults": _get(
                "The --faults settings and how many of each fault were injected so far",
                "getFaults",
                "FaultReport",
            ),
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {"200": {"description": "OpenAPI 3.1 JSON"}},
                }
            },
            "/docs": {
                "get": {
                    "summary": "Human-readable list of the routes",
                    "operationId": "docs",
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
                }
            },
            "/": {
                "get": {
                    "summary": "Redirects to /docs",
                    "operationId": "root",
                    "responses": docs_redirect_doc(),
                }
            },
        },
        "components": _components(
            openapi_schemas(
                Transaction,
                PageMeta,
                Page,
                UserReport,
                UserList,
                Payout,
                PayoutList,
                Problem,
                FaultReport,
            )
        ),
    }
