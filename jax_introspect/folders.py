"""Replacing a folder by a finished one, so that a reader never sees a half-written folder."""
from __future__ import annotations

import os
import shutil
import uuid


def swap_in(staging: str, path: str) -> None:
    """Move the finished folder `staging` to `path`. A folder already at `path` is renamed aside
    (`PATH.old-XXXXXXXX`) first and removed once the new one is in place; if the move fails, the
    old folder stays aside for the caller's clean-up."""
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(staging, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
