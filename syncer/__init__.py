"""syncer: snapshot Globus group memberships into SQLite, with full change history."""

__version__ = "0.2.0"
