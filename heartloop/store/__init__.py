"""Database (SQLAlchemy + Alembic), instance files (atomic, UID-safe paths), durable job queue, outbox."""

from heartloop.store.files import InstanceFiles, uid_component
from heartloop.store.people import ROLES, AuditCheck, active_seconds
from heartloop.store.store import NewInstance, Store, StoredInstance

__all__ = ["ROLES", "AuditCheck", "active_seconds", "InstanceFiles", "NewInstance", "Store", "StoredInstance", "uid_component"]
