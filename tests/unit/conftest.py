"""Fixtures shared by unit tests: the demo GPT-2 BPE and a Llama-3-style tokenizer directory."""
import pytest

from tests.helpers import demo_bpe, llama_tokenizer_dir


@pytest.fixture(scope="module")
def bpe():
    return demo_bpe()


@pytest.fixture(scope="module")
def llama_tok_dir(tmp_path_factory):
    return llama_tokenizer_dir(tmp_path_factory.mktemp("llama_tok"))
