"""Messages any service may send: a refusal of a command, with a stable code."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import Field

from schemas.base import Envelope, Model


class Rejection(Model):
    command_id: uuid.UUID
    command_type: str
    code: str = Field(pattern=r"^[a-z_]+$", description="stable, for programs")
    message: str = Field(max_length=2000, description="one line, for people")


class CommandRejected(Envelope):
    """Answers a command that cannot be carried out (e.g. conflicting parameters).

    Sent to ``reply_to`` when the command had one, and always published as an event
    (routing key ``command.rejected``) so a saga that sent it through its outbox learns.
    """

    type: Literal["command.rejected.v1"] = "command.rejected.v1"
    payload: Rejection

    def routing_key(self) -> str:
        return "command.rejected"
