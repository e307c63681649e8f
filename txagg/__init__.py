"""txagg: an exact, fresh, local copy of a rate-limited Transaction API, aggregated per user."""

__version__ = "0.1.0"
