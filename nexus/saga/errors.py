"""What can go wrong in a step, and whose fault it is: one classification for every path.

A step's error is either the node's own failure (its action, resume, undo or reconcile
raised: the saga fails the node or gets stuck) or the engine's business: the lease was
lost, the database is down, or the transaction lost a race and may simply run again.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

# The database or the network is down: the step rolled back; the lease expires and
# the saga is adopted (by this replica or another) once it is back.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, ConnectionError, TimeoutError)

# PostgreSQL's deadlock_detected and serialization_failure: the transaction lost a race
# with another one and may simply run again. Likewise lock_not_available and
# query_canceled, which lock_timeout and statement_timeout raise (nexus.db.engine): the
# transaction waited too long for another one, often a frozen replica's, which the
# server ends after idle_in_transaction_session_timeout.
_CONTENTION_SQLSTATES = frozenset({"40P01", "40001", "55P03", "57014"})


class LeaseLost(Exception):
    """Another replica owns the saga now; this one must stop writing."""


class Unrecoverable(Exception):
    """The saga's record cannot be run by this definition (bad params, unknown node)."""


class Contended(Exception):
    """A step's transaction lost a race with another (deadlock, serialization): retry it."""


def lost_connection(error: BaseException) -> bool:
    """The database is down or closed this connection (a restart; the timeout that ends
    the transaction of a replica that was frozen): the step rolled back, not the node's
    fault."""
    if isinstance(error, INFRASTRUCTURE_ERRORS):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


def contention(error: BaseException) -> bool:
    if not isinstance(error, DBAPIError):
        return False
    original = error.orig
    code = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return code in _CONTENTION_SQLSTATES


def raise_unless_the_node_failed(error: Exception, node: str | None) -> None:
    """Re-raise ``error`` if it is the engine's business; return if ``node`` failed.

    A lost race becomes :class:`Contended` (the step is run again); a lost lease, an
    unrunnable record and a database that is down propagate as they are.
    """
    if isinstance(error, (LeaseLost, Unrecoverable)) or lost_connection(error):
        raise error
    if contention(error):
        raise Contended(str(node)) from error
    if node is None:
        raise error
