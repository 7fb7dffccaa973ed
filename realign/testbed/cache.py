"""Stage folders named by a hash of their inputs, each built in a temporary sibling and renamed
into place once complete, so an interrupted build resumes at the stage it was in."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ..io.identity import digest
from ..io.output import made_directories, new_staging


def default_cache_dir() -> Path:
    root = os.environ.get("REALIGN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "realign")
    return Path(root).expanduser() / "testbed"


class StageCache:
    """Folders named <stage>-<hash of inputs>; a folder exists only once complete."""

    def __init__(self, root: Path, log: Callable[[str], None]):
        self.root, self.log = root, log
        self.timings: dict[str, float] = {}
        self.built: list[str] = []  # the root is made by the first stage built (a failed build leaves none)

    def stage(self, name: str, key: dict, build: Callable[[Path], None]) -> Path:
        target = self.root / f"{name}-{digest(key)}"
        if (target / "stage.json").exists():
            self.log(f"{name}: cached ({target})")
            self.timings[name] = json.loads((target / "stage.json").read_text()).get("seconds", 0.0)
            return target
        self.log(f"{name}: building ...")
        started = time.perf_counter()
        with made_directories(self.root):
            staging = new_staging(target)  # its pid in the name: a build killed with -9 is cleaned by the next
            try:
                build(staging)
                seconds = round(time.perf_counter() - started, 1)
                (staging / "stage.json").write_text(json.dumps({"stage": name, "key": key, "seconds": seconds}, indent=2, default=str))
                if target.exists():
                    shutil.rmtree(target)
                os.replace(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self.timings[name] = seconds
        self.built.append(name)
        self.log(f"{name}: built in {self.timings[name]:.0f}s ({target})")
        return target
