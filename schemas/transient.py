"""Transient or not: whether a failure is a dependency being down, or the work being wrong.

A consumer whose handler fails because its own database, disk or broker is unavailable
must not count that against the message: the same message succeeds once the dependency
is back. Only a message that is wrong in itself may end in the dead-letter queue. The
transport (:mod:`schemas.transport`), the task supervisor (:mod:`schemas.tasks`) and the
agents' background work all ask :func:`is_transient`, so Nexus and both agents draw the
line in the same place.

What counts as transient:

- the network or the operating system: any ``OSError`` (refused or reset connections,
  timeouts, a full disk, an I/O error), which includes aio-pika's connection errors;
- the broker: a closed channel, a publish that was not confirmed (``PublishFailed``,
  a :class:`Transient`);
- the database: SQLAlchemy's ``OperationalError`` and ``InterfaceError`` (SQLite's
  "database or disk is full", "disk I/O error", "database is locked"; a PostgreSQL
  server that went away), a ``DBAPIError`` whose connection was invalidated, a pool
  checkout that timed out, and any error whose SQLSTATE says the server or the session
  failed rather than the statement: connection exceptions (class 08), insufficient
  resources (53), operator intervention such as a shutdown (57P01-57P03) or a cancelled
  statement (57014, which a statement timeout raises), system errors (58), a lock
  timeout (55P03), an idle-in-transaction timeout (25P03), and a transaction that lost a
  race (40001, 40P01) and may simply run again. asyncpg's own exceptions, which
  SQLAlchemy does not wrap while it connects, carry the same SQLSTATEs.
- a replicated database failing over (Patroni): a write refused by a server that is
  not the primary (25006, read-only transaction: a standby, or a primary being
  demoted), and asyncpg finding no server that accepts writes among those a
  multi-host address names (``target_session_attrs=read-write`` while the standby is
  not yet promoted). The new primary takes the same work moments later; Nexus's engine
  also drops a connection that met a read-only server (``nexus.db.engine``), so the
  next attempt connects afresh and finds the primary.

Everything else (validation, a bug, an integrity violation, an agent's refusal) is not.
An exception raised ``from`` a transient one is transient; a group is transient when
every exception in it is.
"""

from __future__ import annotations

import sqlite3
import sys
from types import ModuleType

import aio_pika

# SQLSTATE classes and codes of a server or session that failed, not the statement.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "58"})
_TRANSIENT_SQLSTATES = frozenset(
    {"57P01", "57P02", "57P03", "57014", "55P03", "25P03", "25006", "40001", "40P01"}
)
# How far along ``__cause__`` to look: a chain is a handful of links, never a cycle.
_MAX_CAUSES = 8


class Transient(Exception):
    """An error that is transient by its nature: raise a subclass of it (the transport's
    ``PublishFailed`` is one) rather than teach :func:`is_transient` a new type."""


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is a dependency being unavailable, so the same work may succeed
    later; False for an error of the work itself (see the module docstring)."""
    if isinstance(error, BaseExceptionGroup):
        return all(is_transient(inner) for inner in error.exceptions)
    link: BaseException | None = error
    for _ in range(_MAX_CAUSES):
        if link is None:
            return False
        if _transient_itself(link):
            return True
        link = link.__cause__
    return False


def _sqlalchemy_errors() -> ModuleType | None:
    """``sqlalchemy.exc`` if SQLAlchemy was imported: otherwise no error can be one of
    its, and a process that never uses a database (``nexusctl disk list``) does not pay
    the 0.1 s of importing it."""
    return sys.modules.get("sqlalchemy.exc")


def _asyncpg_errors() -> ModuleType | None:
    """``asyncpg.exceptions`` if asyncpg was imported (as :func:`_sqlalchemy_errors`)."""
    return sys.modules.get("asyncpg.exceptions")


def _transient_itself(error: BaseException) -> bool:
    asyncpg_errors = _asyncpg_errors()
    if asyncpg_errors is not None and isinstance(
        error, asyncpg_errors.TargetServerAttributeNotMatched
    ):
        return True
    if isinstance(
        error,
        Transient
        | OSError
        | aio_pika.exceptions.ChannelClosed
        | aio_pika.exceptions.ChannelInvalidStateError
        | sqlite3.OperationalError,
    ):
        return True
    sa = _sqlalchemy_errors()
    if sa is None:
        return _transient_sqlstate(error)
    if isinstance(
        error, sa.OperationalError | sa.InterfaceError | sa.DisconnectionError | sa.TimeoutError
    ):
        return True
    if isinstance(error, sa.DBAPIError):
        if error.connection_invalidated:
            return True
        return _transient_sqlstate(error.orig) or _transient_sqlstate(
            getattr(error.orig, "__cause__", None)
        )
    return _transient_sqlstate(error)


def _transient_sqlstate(error: BaseException | None) -> bool:
    """By the SQLSTATE an asyncpg (``sqlstate``) or psycopg (``pgcode``) error carries."""
    if error is None:
        return False
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    if not isinstance(code, str) or len(code) != 5:
        return False
    return code in _TRANSIENT_SQLSTATES or code[:2] in _TRANSIENT_SQLSTATE_CLASSES
