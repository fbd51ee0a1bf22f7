"""The one discriminated union of every message, and the codec for the wire.

Inbound bytes are parsed here exactly once; everything downstream works on typed models.
"""

from __future__ import annotations

from typing import Annotated, get_args

from pydantic import Field, TypeAdapter, ValidationError

from schemas.api import (
    AcceptedReply,
    ApiError,
    DiskCreate,
    DiskDelete,
    DiskGet,
    DiskList,
    DiskListReply,
    DiskReply,
    Doctor,
    DoctorReply,
    InstanceAct,
    InstanceCreate,
    InstanceList,
    InstanceListReply,
    InstanceReply,
    RegionReplacementGet,
    RegionReplacementList,
    RegionReplacementListReply,
    RegionReplacementReply,
    SagaGet,
    SagaList,
    SagaListReply,
    SagaReply,
    SledExpunge,
    SledExpungeReply,
    SledList,
    SledListReply,
    SnapshotCreate,
    SnapshotDelete,
    SnapshotGet,
    SnapshotList,
    SnapshotListReply,
    SnapshotReply,
    UnclaimedEventsList,
    UnclaimedEventsReply,
)
from schemas.base import Envelope
from schemas.common import CommandRejected
from schemas.instance import (
    RepairChanged,
    RepairInfo,
    VmmCrash,
    VmmDiskFlushed,
    VmmDiskSnapshot,
    VmmEnsure,
    VmmGet,
    VmmInfo,
    VmmReboot,
    VmmStateChanged,
    VmmStop,
    VolumeRepair,
    VolumeRepairGet,
)
from schemas.progress import DiskUpdated, InstanceUpdated, SagaProgressed
from schemas.region import (
    RegionDelete,
    RegionEnsure,
    RegionGet,
    RegionInfo,
    RegionList,
    RegionListed,
    RegionStateChanged,
)
from schemas.sled import AgentAnnounced, SledHeartbeat, SledRegistered
from schemas.snapshot import (
    RegionSnapshotCreate,
    RegionSnapshotDelete,
    RegionSnapshotGet,
    RegionSnapshotList,
    RegionSnapshotsInfo,
    RegionSnapshotStateChanged,
    RunningSnapshotRun,
    RunningSnapshotStateChanged,
    RunningSnapshotStop,
)

Message = Annotated[
    RegionEnsure
    | RegionDelete
    | RegionGet
    | RegionList
    | RegionInfo
    | RegionListed
    | RegionStateChanged
    | RegionSnapshotCreate
    | RegionSnapshotDelete
    | RegionSnapshotGet
    | RegionSnapshotList
    | RegionSnapshotsInfo
    | RegionSnapshotStateChanged
    | RunningSnapshotRun
    | RunningSnapshotStop
    | RunningSnapshotStateChanged
    | VmmEnsure
    | VmmStop
    | VmmReboot
    | VmmCrash
    | VmmGet
    | VmmInfo
    | VmmStateChanged
    | VmmDiskSnapshot
    | VmmDiskFlushed
    | VolumeRepair
    | VolumeRepairGet
    | RepairInfo
    | RepairChanged
    | SledRegistered
    | SledHeartbeat
    | AgentAnnounced
    | CommandRejected
    | DiskUpdated
    | InstanceUpdated
    | SagaProgressed
    | DiskCreate
    | DiskGet
    | DiskDelete
    | DiskList
    | SnapshotCreate
    | SnapshotGet
    | SnapshotDelete
    | SnapshotList
    | SnapshotReply
    | SnapshotListReply
    | InstanceCreate
    | InstanceAct
    | InstanceList
    | SagaList
    | SagaGet
    | Doctor
    | UnclaimedEventsList
    | SledList
    | SledExpunge
    | RegionReplacementList
    | RegionReplacementGet
    | DiskReply
    | DiskListReply
    | InstanceReply
    | InstanceListReply
    | SagaReply
    | SagaListReply
    | AcceptedReply
    | DoctorReply
    | UnclaimedEventsReply
    | SledListReply
    | SledExpungeReply
    | RegionReplacementReply
    | RegionReplacementListReply
    | ApiError,
    Field(discriminator="type"),
]

MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)

# Every message class by its wire type, for routing tables, exports and tests.
MESSAGE_TYPES: dict[str, type[Envelope]] = {cls.TYPE: cls for cls in get_args(get_args(Message)[0])}

# Bodies above this are refused before parsing: no legitimate message comes close.
MAX_BODY_BYTES = 256 * 1024
# A refusal names at most this many of a message's field errors.
MAX_FIELD_ERRORS = 10


class MessageRejected(ValueError):
    """Why inbound bytes are not a message we accept; ``reason`` is a stable code.

    Raised by :func:`decode`, and by a handler that refuses a message it parsed (the
    transport dead-letters it at once, with the reason, rather than redelivering it).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode(body: bytes) -> Message:
    """Parse wire bytes into a typed message, or raise :class:`MessageRejected`."""
    if len(body) > MAX_BODY_BYTES:
        raise MessageRejected("too_large", f"{len(body)} bytes > {MAX_BODY_BYTES}")
    try:
        return MESSAGE_ADAPTER.validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        kind = first["type"]
        if kind == "json_invalid":
            raise MessageRejected("invalid_json", first["msg"]) from None
        if kind == "union_tag_invalid":
            tag = first.get("ctx", {}).get("tag", "?")
            raise MessageRejected("unknown_type", f"no message type {str(tag)[:100]!r}") from None
        if kind == "union_tag_not_found":
            raise MessageRejected("unknown_type", "no 'type' field") from None
        raise MessageRejected(
            "schema_violation", f"{error.error_count()} error(s); {field_errors(error)}"
        ) from None


def field_errors(error: ValidationError, limit: int = MAX_FIELD_ERRORS) -> str:
    """The first ``limit`` errors as ``payload.region.generation: <why>``, in one line."""
    shown = []
    for each in error.errors()[:limit]:
        # A discriminated union puts the message type first; the field is the rest.
        location = (
            each["loc"][1:] if each["loc"] and each["loc"][0] in MESSAGE_TYPES else each["loc"]
        )
        shown.append(f"{'.'.join(str(part) for part in location) or '(message)'}: {each['msg']}")
    more = error.error_count() - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def encode(message: Envelope) -> bytes:
    body = message.model_dump_json().encode()
    if len(body) > MAX_BODY_BYTES:
        raise MessageRejected("too_large", f"{message.TYPE} is {len(body)} bytes")
    return body
