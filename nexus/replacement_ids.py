"""The ids of region replacement requests and of their sagas, derived so that filing a
request again, or starting its attempt again, finds the same one. Light on purpose:
``nexusctl`` imports it at start."""

from __future__ import annotations

import uuid

REQUEST_NAMESPACE = uuid.UUID("3f1d7c2a-8b6e-4e21-9a0f-5d4c3b2a1908")


def request_id_for(region_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(REQUEST_NAMESPACE, f"region:{region_id}")


def saga_id_for(request_id: uuid.UUID, attempt: int) -> uuid.UUID:
    """The saga of the request's ``attempt``-th attempt (the first is 1)."""
    return uuid.uuid5(REQUEST_NAMESPACE, f"{request_id}:attempt:{attempt}")
