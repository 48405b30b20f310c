"""``ssehub migrations_known``: may this release run against this database?

A rollback (the role's ``ssehub_rollback``) runs it with the release it returns
to. That release's code knows its own migrations; a database migrated further
by a later release has tables or columns it does not expect, and Django cannot
tell what the unknown migrations changed. So the rule is plain: every
migration recorded as applied must be one this release has (or one a squashed
migration of it replaces). Otherwise exit 1 with the ones it lacks; migrate
back with the later release first (``ssehub migrate APP NAME``).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.db.migrations.loader import MigrationLoader


class Command(BaseCommand):
    help = "Exit 1 when the database holds a migration this release does not have."

    def handle(self, *args: Any, **options: Any) -> None:
        loader = MigrationLoader(connection, ignore_no_migrations=True)
        known = set(loader.disk_migrations)
        for migration in loader.disk_migrations.values():
            known.update(migration.replaces or ())
        unknown = sorted(set(loader.applied_migrations or ()) - known)
        if unknown:
            names = ", ".join(f"{app}.{name}" for app, name in unknown)
            raise CommandError(
                f"the database holds migrations this release does not have: {names}; "
                "migrate back with the release that has them first (ssehub migrate APP NAME)")
        self.stdout.write(f"all {len(loader.applied_migrations or ())} applied migrations "
                          "are known to this release")
