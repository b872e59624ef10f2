"""Packed rows: a document-masked forward pass, and document-by-document attention, equal running each
document alone."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.packing import document_attention, document_causal_mask, document_ids, document_spans


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_document_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3]]


def test_document_spans():
    assert document_spans(torch.tensor([5, 6, 0, 1, 2, 0, 0])) == [(0, 2), (2, 5), (5, 6), (6, 7)]
    assert document_spans(torch.tensor([0, 1, 2])) == [(0, 3)]


def test_packed_forward_matches_separate_documents(model):
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), position_ids=pos, attention_mask=document_causal_mask(pos)).logits
        alone_a, alone_b = model(a).logits, model(b).logits
    torch.testing.assert_close(packed[:, :5], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 5:], alone_b, atol=1e-5, rtol=0)


def test_document_attention_matches_the_mask_and_restores_the_model(model):
    # Two rows with different cuts: one starts mid-document, one has a 1-token document.
    pos = torch.tensor([[3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3],
                        [0, 1, 2, 3, 4, 5, 6, 0, 0, 1, 2, 3]])
    ids = torch.randint(0, 97, pos.shape)
    with torch.no_grad():
        masked = model(ids, position_ids=pos, attention_mask=document_causal_mask(pos)).logits
        with document_attention(model):
            spans = [document_spans(row) for row in pos]
            by_document = model(ids, position_ids=pos, packed_spans=spans).logits
        assert model.config._attn_implementation == "sdpa"
        # Back to the stock path: a padding mask is honoured again (generation relies on it).
        padded = model(torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1, 3:]], 1),
                       attention_mask=torch.tensor([[0] * 3 + [1] * 9])).logits
    torch.testing.assert_close(by_document, masked, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[:, 3:8], masked[:1, 3:8], atol=1e-5, rtol=0)
