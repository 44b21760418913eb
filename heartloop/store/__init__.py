"""Database (SQLAlchemy + Alembic), instance files (atomic, UID-safe paths), durable job queue, outbox."""

from heartloop.store.files import InstanceFiles, uid_component
from heartloop.store.store import NewInstance, Store, StoredInstance

__all__ = ["InstanceFiles", "NewInstance", "Store", "StoredInstance", "uid_component"]
