"""What every CLI command needs: settings, the services' URLs and the caller's credentials."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from shared.client import Flywheel
from shared.settings import Settings


@dataclass
class CliContext:
    settings: Settings
    api_key: str | None
    annotator_token: str | None

    @classmethod
    def from_args(cls, args: Any) -> CliContext:
        return cls(
            settings=Settings.from_env(),
            api_key=getattr(args, "api_key", None) or os.environ.get("FLYWHEEL_API_KEY"),
            annotator_token=getattr(args, "annotator_token", None) or os.environ.get("FLYWHEEL_ANNOTATOR_TOKEN"),
        )

    @property
    def internal_token(self) -> str:
        token = self.settings.internal_token
        if not token:
            path = self.settings.home / "internal-token"
            token = path.read_text().strip() if path.exists() else ""
        if not token:
            raise SystemExit("no internal token: set FLYWHEEL_INTERNAL_TOKEN (`flywheel up` prints where it is)")
        return token

    def partner(self) -> Flywheel:
        if not self.api_key:
            raise SystemExit("this command needs a partner API key: --api-key or FLYWHEEL_API_KEY")
        return Flywheel.from_settings(self.settings, self.api_key)

    def operator(self) -> Flywheel:
        return Flywheel.from_settings(self.settings, self.internal_token)

    def annotator(self) -> Flywheel:
        if not self.annotator_token:
            raise SystemExit("this command needs an annotator token: --annotator-token or FLYWHEEL_ANNOTATOR_TOKEN")
        return Flywheel.from_settings(self.settings, self.annotator_token)


def progress(done: int, total: int | None, label: str, width: int = 30) -> None:
    """A one-line progress bar on stderr (redrawn in place)."""
    if total:
        filled = int(width * min(done, total) / total)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{label} [{bar}] {done}/{total}")
    else:
        sys.stderr.write(f"\r{label} {done}")
    sys.stderr.flush()
