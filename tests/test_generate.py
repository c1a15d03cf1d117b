"""Batched left-padded greedy generation equals one-at-a-time greedy (fp32, tiny random model); teacher-forced
log-probs equal a per-row forward pass."""

from __future__ import annotations

import pytest
import torch
from tiny_models import shared_tokenizer, tiny_model_dir

from qwentune.eval.generate import _cache_name, greedy_generate, prefilled_cache, sequence_logprobs, stop_token_ids


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(tmp_path_factory.mktemp("gen"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, shared_tokenizer()


def _prompts(tokenizer):
    questions = ["Hi", "What is the capital of France? Answer in one word.", "2+2?", "Tell me a long story " * 6, "ok"]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_batched_equals_one_at_a_time(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 2  # really padded
    one = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=1, progress=False)
    batched = greedy_generate(model, tok, prompts, max_new_tokens=12, batch_size=4, progress=False)
    assert batched == one
    assert all(len(ids) > 0 for ids in one)
    # ...and one-at-a-time is plain greedy: argmax of the model's logits, token by token
    ids = torch.tensor([prompts[0]])
    want = []
    for _ in range(len(one[0])):
        nxt = int(model(ids).logits[0, -1].argmax())
        if nxt in stop_token_ids(tok):
            break
        want.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert one[0] == want


def test_prefilled_cache_continues_each_row_as_alone(model_and_tokenizer):
    """The batch cache built from rows run alone (what batched generation starts from): the last prompt token of each
    left-padded row then gives the logits of that row's whole prompt run alone. Fails if transformers' cache stops
    round-tripping through iteration and `DynamicCache(ddp_cache_data=...)`."""
    model, tok = model_and_tokenizer
    prompts = _prompts(tok)[:3]
    cache = prefilled_cache(model, prompts, torch.device("cpu"))
    width = max(len(p) for p in prompts)
    assert cache is not None and cache.get_seq_length() == width - 1
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    last = torch.tensor([[p[-1]] for p in prompts])
    positions = torch.tensor([[len(p) - 1] for p in prompts])
    logits = model(input_ids=last, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{_cache_name(): cache}).logits[:, -1]  # fmt: skip
    for row, p in enumerate(prompts):
        alone = model(torch.tensor([p])).logits[0, -1]
        torch.testing.assert_close(logits[row], alone, atol=1e-5, rtol=1e-5)
    assert prefilled_cache(model, [prompts[0], prompts[0][:1]], torch.device("cpu")) is None  # a one-token prompt


def test_sequence_logprobs_ignore_padding_and_unlabelled(model_and_tokenizer):
    model, _ = model_and_tokenizer
    seqs = [([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), ([10, 11, 12], [-100, 11, 12])]
    batched = sequence_logprobs(model, seqs, batch_size=2)
    for (ids, labels), (logp, n) in zip(seqs, batched):
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        want = sum(lp[k - 1, labels[k]].item() for k in range(1, len(ids)) if labels[k] != -100)
        assert n == sum(lab != -100 for lab in labels[1:])
        assert logp == pytest.approx(want, abs=1e-4)
