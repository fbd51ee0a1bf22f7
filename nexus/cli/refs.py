"""Checking names, ids and request bodies before anything is sent, with one-line errors."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from nexus.cli.console import fail
from schemas.base import Name

ModelT = TypeVar("ModelT", bound=BaseModel)

_NAME: TypeAdapter[str] = TypeAdapter(Name)
NAME_RULE = (
    "lower-case letters, digits and '-', starting with a letter and not ending with '-', "
    "at most 63 characters"
)


def project_name(text: str) -> str:
    try:
        return _NAME.validate_python(text)
    except ValidationError:
        fail(f"invalid project name {text!r}: {NAME_RULE}")


def resource_name(text: str, kind: str) -> str:
    try:
        return _NAME.validate_python(text)
    except ValidationError:
        fail(f"invalid {kind} name {text!r}: {NAME_RULE}")


def name_or_id(text: str) -> str | uuid.UUID:
    """A resource reference: an id if it parses as one, else it must be a valid name."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return resource_name(text, "resource")


def validated(model: type[ModelT], **fields: Any) -> ModelT:
    """``model(**fields)``, or one line saying which field is wrong and why."""
    try:
        return model(**fields)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" for problem in error.errors()
        )
        fail(f"invalid request: {problems}")
