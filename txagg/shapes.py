"""Every JSON document txagg's two HTTP servers and its ``--json`` output speak, declared once.

Each shape is a ``TypedDict`` whose keys are the JSON names (the code builds and reads plain
dicts), with pydantic's ``Field`` for constraints, descriptions and examples. The OpenAPI
documents of ``txagg serve`` and ``txagg mock-serve`` are generated from them: their
``components.schemas`` (``openapi_schemas``) and their query parameters (``query_parameters``).

Nothing validates with these at run time: the answers are written by hand-made encoders
(``server.formatting``, ``mock.records``, ``models.dumps``), and the tests check what they write
against these shapes. pydantic is imported here only; the servers import this module when they
build their documents, and ``models``, ``report``, ``store`` and the ``report`` fast path never
do. docs/design.md ("Shapes") says how to add a field.

A shape decorated ``@closed`` lists every key its documents carry (``additionalProperties:
false``): a key the code adds without declaring it here fails the tests. ``@extensible`` ones
may carry more: what a store recorded in earlier runs (``lastCheck``, ``lastRun``,
``discrepancies``), the upstream's records and problems (RFC 9457 allows extension members).
"""

import copy
from decimal import Decimal
from functools import cache
from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, TypeAdapter, WithJsonSchema, with_config
from pydantic.json_schema import GenerateJsonSchema
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from .models import MAX_TIME_TEXT, MAX_USER_ID_LENGTH, TYPES
from .settings import (
    FAULT_KINDS,
    LATE_LOG_SIZE,
    LOAD_WINDOW_MS,
    PAGE_SIZE,
    PAYOUTS_PAGE_DEFAULT,
    PAYOUTS_PAGE_MAX,
    STALE_AFTER_SECONDS,
    TIMED_FAULTS,
)

REF = "#/components/schemas/{model}"

# Every shape says which it is: one without its own config would take its container's.
closed = with_config(ConfigDict(extra="forbid"))
extensible = with_config(ConfigDict(extra="ignore"))

# ---------------------------------------------------------------- building blocks

# An instant as text: asOf to the second (2023-03-16T12:35:00Z), createdAt to the millisecond.
Instant = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
Count = Annotated[int, Field(ge=0)]
# Money is a Decimal in Python and an exact JSON number in every answer (models.dumps).
MONEY = "SCR, exact decimal with at most 2 places"
Money = Annotated[Decimal, Field(description=MONEY)]
UserId = Annotated[str, Field(examples=["074092"])]
TIME_HELP = (
    "UTC unless it says otherwise: 'YYYY-MM-DD HH:MM:SS', 'YYYY-MM-DD' or ISO 8601 "
    f"('2023-03-01T00:00:00Z'). At most {MAX_TIME_TEXT} characters."
)
WINDOW_HELP = (
    "UTC instant: 'YYYY-MM-DD HH:MM:SS', 'YYYY-MM-DD' or ISO 8601 "
    "('2023-02-01T00:00:00Z', '2023-02-01T00:00:00.000Z'). Inclusive, to the millisecond."
)

# ---------------------------------------------------------------- the upstream


@extensible
class Transaction(TypedDict):
    """A transaction as the upstream sends it. txagg quarantines, with the reason, every record
    that breaks this shape, and stores the rest of its page."""

    id: Annotated[str, Field(examples=["41bbdf81-735c-4aea-beb3-3e5f433a30c5"])]
    userId: UserId
    createdAt: Annotated[Instant, Field(examples=["2023-03-16T12:33:11.000Z"])]
    type: Literal[TYPES]
    amount: Annotated[Money, Field(gt=0, multiple_of=Decimal("0.01"), examples=[30])]


@extensible
class PageMeta(TypedDict):
    """How the window is paged; it counts every record on the pages, broken ones included."""

    totalItems: Annotated[Count, Field(description="records in the window")]
    itemCount: Annotated[Count, Field(description="items on this page")]
    itemsPerPage: Count
    totalPages: Count
    currentPage: Count


@extensible
class Page(TypedDict):
    """One page of a window, in createdAt order."""

    items: list[Transaction]
    meta: PageMeta


class TransactionsParameters(TypedDict, total=False):
    """The query of the upstream's ``GET /transactions``; an empty value counts as absent."""

    startDate: Annotated[str, Field(description=WINDOW_HELP + " Default: no bound.")]
    endDate: Annotated[str, Field(description=WINDOW_HELP + " Default: now.")]
    page: Annotated[int, Field(ge=1, default=1, description="Page number, from 1.")]
    limit: Annotated[
        int,
        Field(
            ge=1,
            default=PAGE_SIZE,
            description=f"Items per page; values above {PAGE_SIZE} are capped at {PAGE_SIZE}.",
        ),
    ]


# ---------------------------------------------------------------- reports


@closed
class UserReport(TypedDict):
    """One user's aggregates: the body of ``txagg report USER --json`` and of
    ``GET /users/{userId}``, byte for byte."""

    userId: UserId
    balance: Annotated[Money, Field(description="earned - spent - payout; " + MONEY)]
    earned: Money
    spent: Money
    payout: Money
    paidOut: Annotated[Decimal, Field(description="payout converted to EUR")]
    transactions: Count
    lastTransactionAt: Annotated[Instant, Field(description="createdAt of the latest one")]
    asOf: Annotated[
        Instant | None,
        Field(description="everything before it is counted; null before the first sync"),
    ]


@closed
class UserList(TypedDict):
    """Every user's aggregates, by userId (the mock's ground truth)."""

    items: list[UserReport]
    asOf: Instant


@closed
class Payout(TypedDict):
    """One user's requested payouts, added up."""

    userId: UserId
    amount: Annotated[Decimal, Field(description="all payout requests added, SCR")]
    count: Annotated[int, Field(ge=1, description="payout requests")]


@closed
class PayoutList(TypedDict):
    """Requested payouts, one row per user with any, in userId order: the body of
    ``txagg payouts --json``."""

    items: list[Payout]
    asOf: Instant | None


@closed
class PayoutPage(PayoutList):
    """One page of ``GET /payouts``: the body of ``txagg payouts --json`` plus ``next``."""

    next: Annotated[
        str | None,
        Field(
            description="The next page's URL (relative), null on the last page",
            examples=["/payouts?limit=100&after=074092"],
        ),
    ]


class PayoutsParameters(TypedDict, total=False):
    """The query of ``GET /payouts``; an empty value counts as absent."""

    limit: Annotated[
        int,
        Field(
            ge=1, le=PAYOUTS_PAGE_MAX, default=PAYOUTS_PAGE_DEFAULT, description="Rows per page."
        ),
    ]
    after: Annotated[
        str,
        Field(
            max_length=MAX_USER_ID_LENGTH,
            description="Only users whose userId sorts after this one (the `next` link sets it).",
        ),
    ]
    since: Annotated[
        str,
        Field(
            max_length=MAX_TIME_TEXT,
            description="Only payouts requested at or after this time. " + TIME_HELP,
        ),
    ]
    until: Annotated[
        str,
        Field(
            max_length=MAX_TIME_TEXT,
            description="Only payouts requested before this time. " + TIME_HELP,
        ),
    ]


# ---------------------------------------------------------------- status


@closed
class SyncWindow(TypedDict):
    """The window sync is reading: its start and the page it asks for next."""

    start: Instant | None
    nextPage: int | None


@closed
class Load(TypedDict):
    """The upstream's recent load next to what the rate budget can read."""

    recentPerMinute: Annotated[
        Count | None,
        Field(
            description=f"new transactions a minute, over the {LOAD_WINDOW_MS // 60_000} "
            "minutes before asOf"
        ),
    ]
    ceilingPerMinute: Annotated[Count, Field(description="every request a full page")]
    sustainablePerMinute: Annotated[Count, Field(description="the ceiling less the checks")]
    fallsBehind: bool


@extensible
class Discrepancy(TypedDict):
    """A window whose count the upstream and the store could not agree on."""

    window: tuple[Instant, Instant]
    upstream: Annotated[Count | None, Field(description="its count; null if it gave none")]
    stored: Count
    why: str
    at: Instant


@closed
class UpstreamCounts(TypedDict):
    """Whether the upstream's counts (``meta.totalItems``) can be believed; when not, since when,
    why, and when they are next chased."""

    reliable: bool
    since: NotRequired[Instant]
    why: NotRequired[str]
    nextRepair: NotRequired[Instant]


@extensible
class LastCheck(TypedDict):
    """The last late-arrival check, as it was recorded (null before the first)."""

    at: Instant
    window: NotRequired[tuple[Instant, Instant]]
    upstream: NotRequired[Count | None]
    stored: NotRequired[Count]
    resumed: NotRequired[bool]
    notChased: NotRequired[str]
    repairedTo: NotRequired[Count]


@extensible
class LastRun(TypedDict, total=False):
    """The last sync run, as it was recorded (empty before the first)."""

    at: Instant
    requests: Count
    newTransactions: Count
    complete: bool | None
    behind: bool
    error: Annotated[str, Field(description="why it failed (only a run that failed has it)")]


@closed
class RateBudget(TypedDict):
    """The token bucket every process on the store shares."""

    limit: Annotated[int, Field(ge=1, description="requests ...")]
    perSeconds: Annotated[Decimal, Field(description="... per this many seconds")]
    tokensAvailable: Decimal
    blockedForSeconds: Annotated[Decimal, Field(description="left of a 429's Retry-After")]
    requests: Annotated[Count, Field(description="sent upstream by every process on the store")]
    throttled: Annotated[Count, Field(description="429s drawn")]


@closed
class Standby(TypedDict):
    """A process standing by for the sync lease, and when it last said so."""

    owner: Annotated[str, Field(description="HOST:PID:TERM", examples=["db2:4242:0f3a9c2e71b4"])]
    host: str
    pid: Annotated[int, Field(ge=0)]
    lastSeen: Instant


@closed
class Leader(TypedDict):
    """Who holds the sync lease of a PostgreSQL store (``sync --follow`` on several machines:
    one leads, the others stand by), and the standbys seen in the last 10 minutes."""

    owner: Annotated[
        str | None,
        Field(
            description="HOST:PID:TERM of the last holder (null: never taken)",
            examples=["db1:4242:0f3a9c2e71b4"],
        ),
    ]
    host: str | None
    pid: Annotated[int | None, Field(ge=0)]
    epoch: Annotated[Count, Field(description="how many times the lease was taken")]
    leaseUntil: Annotated[
        Instant | None, Field(description="when the lease runs out unless renewed")
    ]
    active: Annotated[
        bool, Field(description="the lease has not run out and its holder's session is there")
    ]
    standbys: list[Standby]


@closed
class StatusReport(TypedDict):
    """Where sync stands: the body of ``txagg status --json``."""

    store: Annotated[str, Field(description="the store's path")]
    upstream: Annotated[
        str | None,
        Field(
            description="the upstream the store belongs to, normalised (recorded by its first "
            "sync; null before)",
            examples=["https://api.example.com"],
        ),
    ]
    position: Instant | None
    asOf: Instant | None
    lagSeconds: Count | None
    behind: Annotated[
        bool, Field(description=f"never synced, or more than {STALE_AFTER_SECONDS} s behind")
    ]
    window: SyncWindow
    transactions: Count
    users: Count
    quarantined: Count
    conflicts: Count
    verifiedUntil: Instant | None
    load: Load
    discrepancies: list[Discrepancy]
    upstreamCounts: UpstreamCounts
    lastCheck: LastCheck | None
    lastRun: LastRun
    rateBudget: RateBudget
    leader: Annotated[
        Leader | None, Field(description="PostgreSQL stores: the sync leader (null on SQLite)")
    ]


@closed
class FollowState(TypedDict):
    """The in-process sync loop (``--follow``). With ``--workers`` it runs in the supervising
    process: a worker says ``null`` for what it cannot see."""

    enabled: bool
    running: bool | None
    errors: Count | None
    lastError: str | None


@closed
class Status(StatusReport):
    """``GET /status``: the body of ``txagg status --json`` plus ``follow``."""

    follow: FollowState


@closed
class Health(TypedDict):
    """``GET /healthz``: alive, and whether it is ready."""

    status: Literal["ok"]
    ready: bool
    following: bool
    lagSeconds: Count | None
    asOf: Instant | None
    detail: NotRequired[Annotated[str, Field(description="why it is not ready")]]


class HealthParameters(TypedDict, total=False):
    ready: Annotated[bool, Field(description="Answer 503 when not ready.")]


# ---------------------------------------------------------------- the mock's faults


@closed
class FaultSetting(TypedDict):
    probability: Annotated[float, Field(ge=0, le=1)]


@closed
class TimedFaultSetting(TypedDict):
    probability: Annotated[float, Field(ge=0, le=1)]
    seconds: Annotated[float, Field(ge=0)]


FaultSettings = closed(
    TypedDict(
        "FaultSettings",
        {kind: TimedFaultSetting if kind in TIMED_FAULTS else FaultSetting for kind in FAULT_KINDS},
    )
)
FaultCounts = closed(TypedDict("FaultCounts", dict.fromkeys(FAULT_KINDS, Count)))


@closed
class LateArrival(TypedDict):
    id: str
    createdAt: Instant
    visibleAt: Instant


@closed
class FaultReport(TypedDict):
    """The mock's ``GET /faults``: its ``--faults`` settings and what it injected so far."""

    spec: Annotated[str, Field(description="--faults, normalised")]
    settings: FaultSettings
    requests: Annotated[
        Count, Field(description="/transactions requests past the rate limit and validation")
    ]
    injected: FaultCounts
    lateArrivals: Annotated[
        list[LateArrival],
        Field(description=f"the last {LATE_LOG_SIZE} late arrivals: id and when it showed"),
    ]


# ---------------------------------------------------------------- errors


@extensible
class Problem(TypedDict, total=False):
    """Problem details (RFC 9457), as ``application/problem+json``; some carry more members."""

    type: Annotated[str, Field(examples=["about:blank"])]
    title: Annotated[str, Field(description="the status code's reason phrase")]
    status: int
    detail: Annotated[str, Field(description="what is wrong, for a human")]


# ---------------------------------------------------------------- generating the documents


class OpenAPISchema(GenerateJsonSchema):
    """pydantic's JSON Schema as these documents want it: a Decimal is a JSON number (the
    answers write it so), a nullable simple type is ``{"type": [..., "null"]}``, and a property
    carries no title (its name says it)."""

    def decimal_schema(self, schema) -> dict:
        json_schema: dict[str, Any] = {"type": "number"}
        for key, keyword in (
            ("gt", "exclusiveMinimum"),
            ("ge", "minimum"),
            ("lt", "exclusiveMaximum"),
            ("le", "maximum"),
            ("multiple_of", "multipleOf"),
        ):
            if schema.get(key) is not None:
                value = Decimal(schema[key])
                json_schema[keyword] = int(value) if value == value.to_integral() else float(value)
        return json_schema

    def nullable_schema(self, schema) -> dict:
        inner = self.generate_inner(schema["schema"])
        if isinstance(inner.get("type"), str) and not {"enum", "const", "$ref"} & inner.keys():
            return {**inner, "type": [inner["type"], "null"]}
        return super().nullable_schema(schema)

    def field_title_should_be_set(self, schema) -> bool:
        return False


@cache
def adapter(shape: Any) -> TypeAdapter:
    """The (cached) TypeAdapter of a shape: for tests, and for generating the documents."""
    return TypeAdapter(shape)


@cache
def _schemas(shapes: tuple) -> dict:
    inputs = [(shape, "validation", adapter(shape)) for shape in shapes]
    _, top = TypeAdapter.json_schemas(inputs, ref_template=REF, schema_generator=OpenAPISchema)
    found = top.get("$defs", {})
    first = {shape.__name__: found.pop(shape.__name__) for shape in shapes}
    return {**first, **found}


def openapi_schemas(*shapes: Any) -> dict[str, dict]:
    """``components.schemas`` for ``shapes`` (in that order) and every shape they contain, each
    named after its class; references are ``#/components/schemas/<name>``."""
    return copy.deepcopy(_schemas(shapes))


@cache
def _parameters(shape: Any) -> list[dict]:
    schema = adapter(shape).json_schema(schema_generator=OpenAPISchema)
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema["properties"].items():
        description = prop.pop("description", "")
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": prop,
                "description": description,
            }
        )
    return parameters


def query_parameters(shape: Any) -> list[dict]:
    """One OpenAPI query parameter object per key of a query shape, in declaration order."""
    return copy.deepcopy(_parameters(shape))
