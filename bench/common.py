"""What the benches share: the working folder and the header of the result they print."""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any


def start(out: str | None, prefix: str) -> tuple[Path, dict[str, Any]]:
    """The working folder (``out``, else a new temporary one) and the result's header: the machine, torch's
    threads and the versions of fmtune and torch, with an empty ``results``."""
    import torch

    import fmtune

    work = Path(out or tempfile.mkdtemp(prefix=prefix))
    return work, {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                  "versions": {"fmtune": fmtune.__version__, "torch": torch.__version__}, "results": {}}
