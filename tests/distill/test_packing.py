"""Packed rows: a document-masked forward pass equals running each document alone."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.packing import document_causal_mask, document_ids


def test_document_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3]]


def test_packed_forward_matches_separate_documents():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64)
    model = LlamaForCausalLM(cfg).eval()
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), position_ids=pos, attention_mask=document_causal_mask(pos)).logits
        alone_a, alone_b = model(a).logits, model(b).logits
    torch.testing.assert_close(packed[:, :5], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 5:], alone_b, atol=1e-5, rtol=0)
