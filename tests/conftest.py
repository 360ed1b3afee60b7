"""Shared fixtures: the embedded target model (loaded once per session) and small corpora."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def target():
    """SmolLM2-135M-Instruct (embedded GGUF), float32 on CPU."""
    from decoding.target import TargetModel

    return TargetModel.load()


@pytest.fixture(scope="session")
def gsm8k_sparse_index(target):
    """A REST datastore over the first 2,000 GSM8K train answers."""
    from index.corpus import gsm8k, gsm8k_answer_text
    from index.sparse import SparseIndex

    docs = [target.tokenizer(gsm8k_answer_text(r["answer"]))["input_ids"] for r in gsm8k("train")[:2000]]
    return SparseIndex.build(docs)


@pytest.fixture(scope="session")
def dense_docs(target):
    """The first 40 GSM8K train question/answer pairs as chat documents (entries for answers)."""
    from index.defaults import gsm8k_documents

    return gsm8k_documents(target, 40)


@pytest.fixture(scope="session")
def dense_store_dir(target, dense_docs, tmp_path_factory):
    """A small dense datastore (d = 32, values of 8 tokens, several shards)."""
    from index.dense_build import build_dense_datastore

    path = tmp_path_factory.mktemp("dense") / "store"
    build_dense_datastore(target, dense_docs, path, dim=32, value_len=8, shard_rows=1500)
    return path


def tiny_llama(vocab: int = 8, seed: int = 0, scale: float = 4.0):
    """A random 2-layer Llama with a small vocabulary, for exact-distribution tests.

    `scale` sharpens the output distribution so that drafts are accepted often.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model
