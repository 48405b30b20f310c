"""Add the wheels a target interpreter needs that pip skipped on the controller.

``pip download --python-version X.Y.Z`` picks wheels by tag for the target but
evaluates environment markers (``python_full_version < "3.11.3"``) for the
controller's own interpreter. A controller on 3.11.7 therefore leaves out
``async-timeout`` that redis needs on Debian 12's 3.11.2. This script reads
every wheel's Requires-Dist, evaluates the markers for the target version and
downloads whatever is missing (binary wheels only), until nothing is.

Usage: complete_wheelhouse.py WHEEL_DIR TARGET_PYTHON_VERSION -- PIP_DOWNLOAD_ARGS...
"""

from __future__ import annotations

import email.parser
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

MAX_ROUNDS = 10


def _requirements(wheel: Path) -> tuple[str, list[Requirement]]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.BytesParser().parsebytes(zf.read(meta))
    return msg["Name"], [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def main() -> int:
    wheel_dir, target = Path(sys.argv[1]), sys.argv[2]
    pip_args = sys.argv[sys.argv.index("--") + 1 :]
    env = default_environment()
    env["python_full_version"] = target
    env["python_version"] = ".".join(target.split(".")[:2])
    for _ in range(MAX_ROUNDS):
        wheels = list(wheel_dir.glob("*.whl"))
        have = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels}
        missing: set[str] = set()
        for wheel in wheels:
            _, reqs = _requirements(wheel)
            for req in reqs:
                # Extras requested by other wheels are already resolved by pip;
                # only unconditional and version-dependent requirements matter.
                if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                    continue
                if canonicalize_name(req.name) not in have:
                    missing.add(str(Requirement(f"{req.name}{req.specifier}")))
        if not missing:
            return 0
        print(f"complete_wheelhouse: adding {sorted(missing)}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheel_dir),
             *pip_args, *sorted(missing)],
            check=True,
        )
    print("complete_wheelhouse: did not converge", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
