"""The README stays a short way in, and every relative link in README.md and docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def prose(path: Path) -> str:
    """The file's text without fenced code blocks (no links or headings there)."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links of a Markdown file whose file or #anchor does not exist."""
    broken = []
    for target in LINK.findall(prose(path)):
        if re.match(r"(https?|mailto):", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{path.name}: {target} (no such heading)")
    return broken


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_every_relative_link_resolves():
    assert [b for path in [ROOT / "README.md", *DOCS] for b in broken_links(path)] == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(prose(ROOT / "README.md"))}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_slugs_follow_github():
    assert slug("Measured: `make run && make eval` on this machine") == "measured-make-run--make-eval-on-this-machine"
    assert slug("Agreement with people (`benchmarks/quality_scorer.py`)") == "agreement-with-people-benchmarksquality_scorerpy"


def test_the_docs_quote_the_pipelines_stage_count_and_defaults_as_the_code_has_them():
    import yaml

    from mods.config import PipelineConfig
    from mods.pipeline import PIPELINE
    from mods.scoring.config import ScorerConfig

    readme = (ROOT / "README.md").read_text()
    testing = (ROOT / "docs" / "testing.md").read_text()
    # One row per stage in the README's table, in the pipeline's order; every count of them says as many.
    assert re.findall(r"^\| \[`(\w+)`\]\(mods/stages/", readme, re.M) == list(PIPELINE)
    counts = re.findall(r"shows the (\d+)\s+tasks", readme) + re.findall(r"(\d+) \*(?:Completed|Cached)\*", testing)
    assert len(counts) == 3 and set(counts) == {str(len(PIPELINE))}
    # The default scorer, where the README, the scoring page and the demo config name it.
    kind = ScorerConfig().kind
    assert re.findall(r"default scorer \(`([\w-]+)`\)", readme) == [kind]
    assert re.findall(r"^## The default scorer: `([\w-]+)`", (ROOT / "docs" / "scoring.md").read_text(), re.M) == [kind]
    header = "".join(line for line in (ROOT / "configs" / "demo-cpu.yaml").read_text().splitlines(True)
                     if line.startswith("#"))
    assert re.findall(r"(preference|likelihood|reward-model) scorer", header) == [kind]
    # The CPU defaults the README quotes: rows, seed + augmented sizes, answer length.
    defaults = PipelineConfig()
    quoted = re.search(r"small defaults \((\d+) rows, (\d+) \+ (\d+) selected, (\d+)-token answers\)", readme)
    assert quoted and [int(g) for g in quoted.groups()] == [
        defaults.sample.rows, defaults.seed_selection.k, defaults.necessity.k,
        defaults.necessity.generation.max_new_tokens]
    # The presets' sizes that docs/configuration.md quotes, and relative_to_seed: on by default, off in them.
    configuration = " ".join((ROOT / "docs" / "configuration.md").read_text().split())
    for name, label in (("paper-alpaca", "for Alpaca-52k"), ("paper-mix", "for the 214k mix")):
        preset = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        seed, augmented = preset["seed_selection"]["k"], preset["necessity"]["k"]
        assert re.search(rf"{seed + augmented:,} (rows selected in all )?{label} \({seed:,} (seed )?\+ {augmented:,}",
                         configuration), (name, seed, augmented)
        assert preset["necessity"]["relative_to_seed"] is False
    assert defaults.necessity.relative_to_seed is True
