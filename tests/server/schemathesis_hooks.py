"""Schemathesis hooks of ``test_fuzz.py``: valid data may be refused only for the rules a JSON
schema cannot state, each with its own error code (schemathesis' own ``positive_data_acceptance``
check would call any such 422 a contract failure)."""

from __future__ import annotations

from typing import Any

import schemathesis

# Rules between fields or against state: totals of a request, equal lengths, live rows, budgets.
BEYOND_SCHEMA = {
    "inconsistent_request",
    "too_many_tokens",
    "logits_too_large",
    "row_not_live",
    "max_new_tokens",
    "context_full",
    "session_too_large",
}
ACCEPTED = {401, 403, 404, 409, 429}  # no key, no head, no such session, over a cap or quota


@schemathesis.check
def positive_data_refused_only_beyond_the_schema(ctx: Any, response: Any, case: Any) -> None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    status = response.status_code
    if status < 400 or status in ACCEPTED:
        return
    code = None
    if status in (413, 422):
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
    if code not in BEYOND_SCHEMA:
        raise AssertionError(f"valid data refused with {status} ({code}): {response.text[:300]}")
