"""Text sources to token batches (:mod:`.text`): built-in corpora, local files and folders, Hugging
Face datasets; tokenized, chunked and cached."""

from perturb_lens.data.text import (
    chunk_tokens,
    dataset_tokens,
    default_text_source,
    load_texts,
    load_tokens,
    save_tokens,
    token_source_hash,
    tokenize_dataset,
)

__all__ = [
    "chunk_tokens",
    "dataset_tokens",
    "default_text_source",
    "load_texts",
    "load_tokens",
    "save_tokens",
    "token_source_hash",
    "tokenize_dataset",
]
