"""`make test-compat`: the unit tier in throwaway environments at both ends of pyproject's ranges.

``oldest`` pins every direct dependency to the release line of the lower bound pyproject allows
(``>=2.4`` becomes ``==2.4.*``: the oldest release with its bug fixes). As with uv's ``lowest-direct``,
the rest resolves to the newest release compatible with those pins. ``newest`` takes today's newest
release of everything, above the lock. Each environment prints the versions of torch,
transformers, peft and lightning and the test summary; the table at the end goes in the README.
Needs the network (PyPI) and several minutes; not part of CI.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "peft", "lightning")
UNIT_TIER = ["tests/unit", "-q", "-p", "no:cacheprovider", "--timeout=300"]


def lower_bounds(extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """``name==lower`` for every dependency of pyproject (and the given extras) that has a lower bound."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", requirement)
        name, specifiers = match.group(1), match.group(3)
        lower = re.search(r">=\s*([0-9][^,;\s]*)", specifiers)
        if lower:
            pins.append(f"{name}=={lower.group(1)}.*")  # the newest patch of the oldest allowed release
    return pins


def run(command: list[str], *, env: dict | None = None, log=None) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, env=env, text=True, stdout=log, stderr=subprocess.STDOUT)


def build(name: str, root: Path, log) -> Path:
    python = root / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(root)], log=log).check_returncode()
    pip = [str(python), "-m", "pip", "install", "-q"]
    env = dict(os.environ)
    if name == "oldest":
        constraints = root / "constraints.txt"
        constraints.write_text("\n".join(lower_bounds()) + "\n")
        command = [*pip, "-c", str(constraints), "-e", ".[dev]"]
    else:
        # A machine-wide pip constraint (a cap at the builds on local disk) must not hide the newest releases.
        env["PIP_CONSTRAINT"] = "/dev/null"
        command = [*pip, "--upgrade", "--upgrade-strategy", "eager", "-e", ".[dev]"]
    run(command, env=env, log=log).check_returncode()
    return python


def versions(python: Path) -> dict[str, str]:
    code = f"import importlib.metadata as m; print(' '.join(m.version(p) for p in {PACKAGES!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(PACKAGES, out, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("envs", nargs="*", help="oldest and/or newest (default: both)")
    parser.add_argument("--dir", type=Path, default=ROOT / ".compat", help="where the environments live")
    parser.add_argument(
        "--keep", action="store_true", help="reuse existing environments instead of rebuilding"
    )
    args = parser.parse_args()
    unknown = set(args.envs) - {"oldest", "newest"}
    if unknown:
        parser.error(f"unknown environment(s) {sorted(unknown)}: choose oldest and/or newest")
    rows = []
    for name in args.envs or ["oldest", "newest"]:
        root = args.dir / name
        if root.exists() and not args.keep:
            subprocess.run(["rm", "-rf", str(root)], check=True)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "log.txt", "w") as log:
            start = time.time()
            python = build(name, root, log)
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
            result = run([str(python), "-m", "pytest", *UNIT_TIER], env=env, log=log)
        summary = (root / "log.txt").read_text().strip().splitlines()[-1]
        rows.append((name, versions(python), "pass" if result.returncode == 0 else "FAIL", summary))
        print(f"{name}: {rows[-1][2]} ({summary}) in {time.time() - start:.0f} s; log: {root / 'log.txt'}")
    header = "| environment | " + " | ".join(PACKAGES) + " | unit tier |"
    table = [header, "|" + "---|" * (len(PACKAGES) + 2)]
    for name, found, status, summary in rows:
        table.append(f"| {name} | " + " | ".join(found[p] for p in PACKAGES) + f" | {status}: {summary} |")
    text = "\n".join(table)
    print(text)
    (args.dir / "report.md").write_text(text + "\n")
    return 0 if all(status == "pass" for _, _, status, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
