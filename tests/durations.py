"""Where the suite's time goes, from a JUnit XML report (pytest --junitxml), and the
measured seconds per test file that decide the order files start in (tests/durations.json,
read by tests/conftest.py: the longest first, so that the test processes end together).

    .venv/bin/python -m pytest -n 2 --junitxml=/tmp/junit.xml ...   # or: make test-durations
    .venv/bin/python tests/durations.py /tmp/junit.xml                # tables: by layer, by file
    .venv/bin/python tests/durations.py /tmp/junit.xml --write        # and update tests/durations.json

A test's seconds are its setup, call and teardown together (JUnit's `time`), so a module
fixture's set-up (an image build, a server) counts in its file's first test.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

DURATIONS_FILE = Path(__file__).resolve().parent / "durations.json"


def file_seconds(junit_xml: Path) -> dict[str, tuple[float, int]]:
    """(seconds, tests) per test file, keyed by its path under tests/ (``system/test_e2e.py``)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        # classname is the module's dotted path: tests.system.test_e2e (a class adds one part)
        parts = case.get("classname", "").split(".")
        if len(parts) < 3 or parts[0] != "tests":
            continue
        module = next((i for i, part in enumerate(parts) if part.startswith("test_")), None)
        if module is None:
            continue
        path = "/".join(parts[1:module + 1]) + ".py"
        totals[path][0] += float(case.get("time") or 0.0)
        totals[path][1] += 1
    return {path: (round(seconds, 1), int(count)) for path, (seconds, count) in totals.items()}


def read_durations() -> dict[str, float]:
    """The recorded seconds per file (empty where the file is missing or unreadable)."""
    try:
        return {path: float(seconds) for path, seconds in json.loads(DURATIONS_FILE.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def tables(files: dict[str, tuple[float, int]]) -> str:
    layers: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for path, (seconds, count) in files.items():
        layer = path.split("/")[0]
        layers[layer][0] += seconds
        layers[layer][1] += count
    total = sum(seconds for seconds, _ in files.values())
    lines = ["| layer | tests | seconds |", "|---|---:|---:|"]
    lines += [f"| {layer} | {count:.0f} | {seconds:,.0f} |"
              for layer, (seconds, count) in sorted(layers.items(), key=lambda item: -item[1][0])]
    lines += [f"| **all** | {sum(c for _, c in files.values())} | {total:,.0f} |", "",
              "| file | tests | seconds |", "|---|---:|---:|"]
    lines += [f"| {path} | {count} | {seconds:,.0f} |"
              for path, (seconds, count) in sorted(files.items(), key=lambda item: -item[1][0])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("junit_xml", type=Path)
    parser.add_argument("--write", action="store_true", help=f"update {DURATIONS_FILE.name} with these seconds")
    args = parser.parse_args(argv)
    try:
        files = file_seconds(args.junit_xml)
    except (OSError, ElementTree.ParseError) as error:
        print(f"durations: cannot read {args.junit_xml}: {error}", file=sys.stderr)
        return 2
    if not files:
        print(f"durations: no test of tests/ in {args.junit_xml}", file=sys.stderr)
        return 2
    print(tables(files))
    if args.write:
        # Files this report did not run keep their recorded seconds (a partial run updates its part).
        merged = {**read_durations(), **{path: seconds for path, (seconds, _) in files.items()}}
        DURATIONS_FILE.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
        print(f"\nwrote {DURATIONS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
