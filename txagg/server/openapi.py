"""The OpenAPI 3.1 document of ``txagg serve`` (``/openapi.json``; ``/docs`` renders it).

The routes, answers and headers are written here; the bodies' schemas and the query parameters
are generated from the shapes in ``txagg.shapes`` when the document is built.
"""

from __future__ import annotations

from .. import __version__
from .. import server as package  # QUERY_SECONDS is read from there at call time
from ..httpserve import JSON_TYPE, docs_redirect_doc
from ..httpserve import problem_response_doc as _problem_response
from ..report import STALE_AFTER_SECONDS
from ..store import is_postgres_url
from .config import MAX_HEADER_BYTES, MAX_PATH_BYTES, ServeConfig


def _json_response(description: str, schema: str, cached: bool) -> dict:
    response: dict = {
        "description": description,
        "content": {JSON_TYPE: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if cached:
        response["headers"] = {
            "ETag": {"$ref": "#/components/headers/ETag"},
            "Cache-Control": {"$ref": "#/components/headers/Cache-Control"},
        }
    return response


IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": (
        "An ETag from an earlier answer: 304 Not Modified while the data has not changed."
    ),
}


def _common_errors(config: ServeConfig, *, public: bool = False) -> dict:
    errors = {
        "413": _problem_response("The request has a body: this API takes none"),
        "414": _problem_response(f"Path or query longer than {MAX_PATH_BYTES} bytes"),
        "431": _problem_response(f"Headers larger than {MAX_HEADER_BYTES} bytes"),
    }
    if config.token is not None and not public:
        errors["401"] = _problem_response(
            "No or a wrong bearer token", **{"WWW-Authenticate": "Bearer"}
        )
    return errors


def _not_modified() -> dict:
    return {
        "description": "Not Modified: the If-None-Match ETag is still current",
        "headers": {
            "ETag": {"$ref": "#/components/headers/ETag"},
            "Cache-Control": {"$ref": "#/components/headers/Cache-Control"},
        },
    }


def _users_operation(config: ServeConfig) -> dict:
    return {
        "get": {
            "summary": "One user's balance, earned, spent, payout and paidOut",
            "description": "The body of `txagg report USER --json`, byte for byte.",
            "operationId": "getUser",
            "parameters": [IF_NONE_MATCH],
            "responses": {
                "200": _json_response("The user's aggregates", "UserReport", cached=True),
                "304": _not_modified(),
                "404": {
                    **_problem_response("No transaction of this user is stored"),
                    "headers": {"Cache-Control": {"$ref": "#/components/headers/Cache-Control"}},
                },
                **_common_errors(config),
            },
        },
        "parameters": [
            {
                "name": "userId",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
                "description": "",
            }
        ],
    }


def _payouts_operation(config: ServeConfig, parameters: list[dict]) -> dict:
    return {
        "get": {
            "summary": "Requested payouts, one row per user, in userId order",
            "description": (
                "The body of `txagg payouts --json` plus `next`, a page at a time (keyset "
                "pagination on userId: no row is lost or repeated while the data changes)."
            ),
            "operationId": "listPayouts",
            "parameters": [*parameters, IF_NONE_MATCH],
            "responses": {
                "200": _json_response("One page of payouts", "PayoutPage", cached=True),
                "304": _not_modified(),
                "400": _problem_response("A parameter is malformed or out of range"),
                "503": _problem_response(
                    f"The since/until period took more than {package.QUERY_SECONDS} s to add up"
                ),
                **_common_errors(config),
            },
        }
    }


def _simple_operation(config: ServeConfig, summary: str, operation_id: str, ok: dict) -> dict:
    return {
        "get": {
            "summary": summary,
            "operationId": operation_id,
            "responses": {"200": ok, **_common_errors(config)},
        }
    }


def _healthz_operation(config: ServeConfig, parameters: list[dict]) -> dict:
    replica = ""
    if is_postgres_url(config.db) and config.local_copy:
        replica = (
            " It is not ready either once this process's copy of the store was last brought "
            f"up to date more than {config.stale_after} s ago (PostgreSQL unreachable)."
        )
    return {
        "get": {
            "summary": "Liveness, and with ready=true readiness",
            "description": (
                "Always answers 200 while the process serves (liveness); the body says whether "
                "it is ready. With `ready=true` it answers 503 when it is not: only while "
                f"following, when the data is more than {STALE_AFTER_SECONDS} s behind or the "
                f"sync loop has stopped.{replica} Needs no token."
            ),
            "operationId": "health",
            "parameters": parameters,
            "responses": {
                "200": _json_response("Alive", "Health", cached=False),
                "400": _problem_response("ready is not a boolean"),
                "503": _problem_response("Not ready (only with ready=true)"),
                **_common_errors(config, public=True),
            },
        }
    }


def _components(config: ServeConfig, schemas: dict) -> dict:
    components: dict = {
        "schemas": schemas,
        "headers": {
            "ETag": {
                "description": "Weak validator from the data version (transactions and asOf)",
                "schema": {"type": "string"},
            },
            "Cache-Control": {
                "description": (
                    f"max-age at most {config.max_age} s and never past the "
                    f"{STALE_AFTER_SECONDS} s freshness promise"
                ),
                "schema": {"type": "string"},
            },
        },
    }
    if config.token is not None:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return components


def openapi_document(config: ServeConfig) -> dict:
    """The OpenAPI 3.1 description of every route this server answers, as configured."""
    # pydantic is imported here, when a server builds its document: never by ``import
    # txagg.server``, never on a request path.
    from ..shapes import (
        Health,
        HealthParameters,
        Payout,
        PayoutPage,
        PayoutsParameters,
        Problem,
        Status,
        UserReport,
        openapi_schemas,
        query_parameters,
    )

    auth = "every route but /healthz needs a bearer token. " if config.token else ""
    document: dict = {
        "openapi": "3.1.0",
        "info": {
            "title": "txagg HTTP API",
            "version": __version__,
            "description": (
                "Per-user aggregates and requested payouts from the local txagg store. "
                + auth
                + "Errors are application/problem+json: 404 for unknown routes, 405 for methods "
                "other than GET and HEAD."
            ),
        },
        "paths": {
            "/users/{userId}": _users_operation(config),
            "/payouts": _payouts_operation(config, query_parameters(PayoutsParameters)),
            "/status": _simple_operation(
                config,
                "Where sync stands: position, lag, counts, quarantine, rate budget",
                "status",
                _json_response("The status", "Status", cached=False),
            ),
            "/healthz": _healthz_operation(config, query_parameters(HealthParameters)),
            "/metrics": _simple_operation(
                config,
                "Prometheus metrics (text format 0.0.4)",
                "metrics",
                {"description": "Metrics", "content": {"text/plain": {}}},
            ),
            "/openapi.json": _simple_operation(
                config,
                "This document",
                "openapi",
                {"description": "OpenAPI 3.1 JSON", "content": {JSON_TYPE: {}}},
            ),
            "/docs": _simple_operation(
                config,
                "Human-readable list of the routes",
                "docs",
                {"description": "HTML", "content": {"text/html": {}}},
            ),
            "/": {
                "get": {
                    "summary": "Redirects to /docs",
                    "operationId": "root",
                    "responses": {**docs_redirect_doc(), **_common_errors(config)},
                }
            },
        },
        "components": _components(
            config, openapi_schemas(UserReport, Payout, PayoutPage, Status, Health, Problem)
        ),
    }
    if config.token is not None:
        document["security"] = [{"bearer": []}]
        document["paths"]["/healthz"]["get"]["security"] = []
    return document
