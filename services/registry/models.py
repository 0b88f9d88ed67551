"""Registry's tables. Its domain tables arrive with its feature issue; the bus tables are here already."""

from __future__ import annotations

from shared.db import declarative_base

Base = declarative_base()
