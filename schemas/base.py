"""The envelope every message shares, and the building blocks of payloads.

Every message on the wire is one frozen pydantic model: the envelope fields plus a
``type`` literal and a typed ``payload``. Inbound bytes are parsed exactly once, by the
discriminated union in :mod:`schemas.messages`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

# Names follow Oxide's rules for resource names: lower case, starts with a letter.
Name = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$", max_length=63),
]
# Who sent a message: "nexus/<replica>", "crucible/<agent>", "sled/<sled>", "cli/<host>".
Source = Annotated[str, StringConstraints(pattern=r"^[a-z-]+/[A-Za-z0-9._:@-]{1,100}$")]

# Every integer on the wire has bounds that Nexus's database can store, so a value out of
# range is refused once, at parsing, rather than failing a handler at every delivery.
# Counts, sizes and generations are stored in BIGINT columns (2^63 - 1); they stop at
# 2^53 - 1, which leaves room for arithmetic (a generation + 1, a sum of sizes) and is
# the largest integer every JSON parser reads exactly (RFC 7493: JavaScript's and any
# other double-based parser's). One change a microsecond takes 285 years to get there.
MAX_SAFE_INTEGER = 2**53 - 1
# Counts stored in INTEGER columns (CPUs, extents per region) stop where PostgreSQL's
# INTEGER does.
MAX_INT32 = 2**31 - 1
PositiveInt = Annotated[int, Field(gt=0, le=MAX_SAFE_INTEGER)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_SAFE_INTEGER)]
PositiveInt32 = Annotated[int, Field(gt=0, le=MAX_INT32)]
NonNegativeInt32 = Annotated[int, Field(ge=0, le=MAX_INT32)]
Generation = Annotated[int, Field(ge=1, le=MAX_SAFE_INTEGER)]
Port = Annotated[int, Field(ge=0, le=65535)]
BlockSize = Annotated[int, Field(strict=True, ge=512, le=4096, multiple_of=512)]

# The namespace of deterministic command ids: uuid5(namespace, f"{saga}:{node}").
COMMAND_NAMESPACE = uuid.UUID("6f1c1d52-4a7e-4b53-9d7e-0a5c1f7e2b11")


def utcnow() -> datetime:
    return datetime.now(UTC)


def command_id(saga_id: uuid.UUID, node: str, attempt: int = 0) -> uuid.UUID:
    """The id a saga node gives the command it sends, the same on every re-run."""
    return uuid.uuid5(COMMAND_NAMESPACE, f"{saga_id}:{node}:{attempt}")


class Model(BaseModel):
    """Frozen and strict about unknown fields: a typo on the wire is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Envelope(Model):
    """Fields every message carries; subclasses add ``type`` and ``payload``."""

    TYPE: ClassVar[str]
    # A message that must be answered (request/reply) or that commands an agent.
    IS_COMMAND: ClassVar[bool] = False

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    source: Source
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    correlation_id: uuid.UUID | None = None
    causation_id: uuid.UUID | None = None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: object) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        type_field = cls.model_fields.get("type")
        if type_field is not None:
            cls.TYPE = str(type_field.default)

    def caused(self, **fields: object) -> dict[str, object]:
        """Envelope fields for a message that this one caused (same correlation)."""
        return {
            "correlation_id": self.correlation_id or self.id,
            "causation_id": self.id,
            **fields,
        }

    def with_id(self, message_id: uuid.UUID) -> Self:
        return self.model_copy(update={"id": message_id})
