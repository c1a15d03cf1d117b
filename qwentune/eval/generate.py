"""Batched greedy generation and teacher-forced log-probs for evaluation.

Prompts are sorted by length, left-padded into batches with an attention mask (transformers' generate derives the
position ids from it, so a padded row sees the positions it would alone), and decoded greedily with a plain
generation config (no sampling, no repetition penalty) until `<|im_end|>` / `<|endoftext|>`. In fp32 the tokens equal
one-at-a-time greedy decoding (tests/test_generate.py).

Each prompt but its last token is run alone first and the keys and values are left-padded into one batch cache: a
padded batch forward of long prompts costs more than the same prompts one by one on a CPU (padding and SDPA's
masked path: ~1.4× for 16 tool prompts of ~400 tokens on 2 cores), while decoding, one token per row per step,
gains from the batch. The prompt-only forwards keep the logits of the last position only (`logits_to_keep=1`).

`sample_generate` samples several replies per prompt (for mining preference pairs), seeded per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a generation: <|im_end|>, <|endoftext|> and the tokenizer's eos, those it knows."""
    ids = []
    for token in (*STOP_TOKENS, tokenizer.eos_token):
        tid = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def _pad_id(tokenizer: Any, stops: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]


def greedy_config(tokenizer: Any, max_new_tokens: int) -> Any:
    """Plain greedy decoding until a stop token (the model's own sampling defaults must not leak in)."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=_pad_id(tokenizer, stops),
        repetition_penalty=1.0,
        temperature=1.0,  # the neutral values
        top_p=1.0,
        top_k=50,
    )


def cut_at_stop(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The generated tokens before the first stop token."""
    tokens = list(tokens)
    return tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generating",
) -> list[list[int]]:
    """Greedy continuations (token ids, without the stop token) of each prompt, in the prompts' order."""
    from tqdm.auto import tqdm

    stops = stop_token_ids(tokenizer)
    pad = _pad_id(tokenizer, stops)
    config = greedy_config(tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), max(1, batch_size)):
            chunk = order[start : start + max(1, batch_size)]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                n = len(prompts[i])
                ids[row, width - n :] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[row, width - n :] = 1
            cache = prefilled_cache(model, [prompts[i] for i in chunk], device) if len(chunk) > 1 else None
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                **({_cache_name(): cache} if cache is not None else {}),
            )  # fmt: skip
            for row, i in enumerate(chunk):
                out[i] = cut_at_stop(generated[row, width:].tolist(), stops)
            bar.update(len(chunk))
    return out


@torch.no_grad()
def sample_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    samples: int,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 256,
    progress: bool = True,
    desc: str = "sampling",
) -> list[list[list[int]]]:
    """`samples` sampled continuations (token ids, without the stop token) of each prompt at `temperature` (no top-k,
    no top-p). Prompt i is sampled with the seed `seed + i`, its samples in one batch of the one prompt (no padding):
    the same prompts and seed give the same tokens whatever else is sampled; the global RNG is left as it was."""
    from tqdm.auto import tqdm

    stops = stop_token_ids(tokenizer)
    config = greedy_config(tokenizer, max_new_tokens)
    config.do_sample, config.temperature, config.top_k, config.top_p = True, float(temperature), 0, 1.0
    config.num_return_sequences = samples
    device = next(model.parameters()).device
    out: list[list[list[int]]] = []
    for i, prompt in enumerate(tqdm(prompts, desc=desc, disable=not progress, leave=False)):
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + i)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append([cut_at_stop(row, stops) for row in generated[:, ids.shape[1] :].tolist()])
    return out


def _cache_name() -> str:
    """transformers renamed `past_key_values` to `cache` (model outputs and generate's keyword; 5.24 has both, the
    old one deprecated until 6.0): the name this version has."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def prefilled_cache(model: Any, prompts: Sequence[Sequence[int]], device: Any) -> Any:
    """A batch cache of every prompt but its last token, each run alone, left-padded to the longest; generate() then
    starts at the last token of each row. None (generate prefills the padded batch itself) for a prompt of one token
    or a cache that is not plain keys and values per layer (a sliding window)."""
    from transformers import DynamicCache

    if min(len(p) for p in prompts) < 2:
        return None
    name = _cache_name()
    rows = [list(getattr(model(input_ids=torch.tensor([list(p)[:-1]], device=device), use_cache=True,
                               logits_to_keep=1), name))  # only the cache is used: no vocabulary-wide head per token
            for p in prompts]  # fmt: skip
    width = max(len(p) for p in prompts) - 1
    layers = []
    for per_row in zip(*rows, strict=True):  # one layer: (keys, values, sliding window) of each row
        if any(len(kv) > 2 and kv[2] is not None for kv in per_row):
            return None
        keys, values = ([torch.nn.functional.pad(kv[j], (0, 0, width - kv[j].shape[2], 0)) for kv in per_row]
                        for j in (0, 1))  # fmt: skip
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(ddp_cache_data=layers)


@torch.no_grad()
def sequence_logprobs(
    model: Any, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 8
) -> list[tuple[float, int]]:
    """For each (input_ids, labels) with -100 on untrained tokens: (sum of log p of the labelled tokens given what
    precedes them, number of labelled tokens). Right-padded batches; padding never counts."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), max(1, batch_size)):
        chunk = sequences[start : start + max(1, batch_size)]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (seq, lab) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(list(seq))
            labels[row, : len(lab)] = torch.tensor(list(lab))
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out += labelled_logprobs(logits, labels)
    return out


def labelled_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """Per row of a batch: (sum of log p of the labelled tokens given what precedes them, number of them); -100 is
    not labelled (prompt tokens, padding)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    targets = labels[:, 1:].to(logp.device)
    keep = targets != -100
    picked = logp.gather(2, targets.clamp(min=0)[..., None])[..., 0] * keep
    return [(picked[row].sum().item(), int(keep[row].sum().item())) for row in range(len(labels))]


__all__ = [
    "STOP_TOKENS",
    "cut_at_stop",
    "greedy_config",
    "greedy_generate",
    "labelled_logprobs",
    "sample_generate",
    "sequence_logprobs",
    "stop_token_ids",
]
