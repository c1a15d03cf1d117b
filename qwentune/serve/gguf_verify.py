"""Check a written GGUF against the model it came from: transformers loads it back (dequantized), then logits on
parity rows, greedy tokens on a sample prompt and tokenizer ids must match the source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import QwentuneError

# q8_0 stores each 32-value block as int8 × one f16 scale; measured max |Δlogit| 0.29 at logit scale 32.6 on the real
# Qwen2.5-Coder-0.5B (0.9%) and 0.010 at scale 0.86 on a tiny random model: ~4x headroom over both.
Q8_0_TOLERANCE_ABS = 0.1
Q8_0_TOLERANCE_REL = 0.04
GREEDY_TOKENS = 16
SAMPLE_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
ROUNDTRIP_TEXT = '<|im_start|>user\nHello, wörld! 你好 <tool_call>{"a": 1}</tool_call><|im_end|>\n<|endoftext|>'


def gguf_tolerance(gtype: str, reference_scale: float) -> float:
    """f16/bf16: the merge's 16-bit tolerance (the same rounding of the same weights); q8_0: its own, above."""
    if gtype == "q8_0":
        return max(Q8_0_TOLERANCE_ABS, Q8_0_TOLERANCE_REL * reference_scale)
    from ..export import default_tolerance

    return default_tolerance(torch.bfloat16, reference_scale)


def _render(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def parity_rows(tokenizer) -> list[list[int]]:
    """Short rows (the 151,936-token vocab makes logits the cost): two prompts rendered with the model's own chat
    template (a plain text row without one), and a row of special tokens in the order they appear in chats. The
    merge's rows in export.py are random ids plus specials; these are the prompts a served model sees."""
    from ..model import ENDOFTEXT, IM_END, IM_START

    if tokenizer.chat_template:
        rows = [
            _render(tokenizer, [{"role": "user", "content": "Hi! What is 2+2?"}]),
            _render(
                tokenizer,
                [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "Name a prime."},
                    {"role": "assistant", "content": "7"},
                    {"role": "user", "content": "Another?"},
                ],
            ),
        ]
    else:
        rows = [tokenizer.encode("def add(a, b):\n    return a + b\n", add_special_tokens=False)]
    specials = [tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END, ENDOFTEXT)]
    extra = [i for i in tokenizer.added_tokens_decoder if i not in specials][:8]
    text = tokenizer.encode("user\nok", add_special_tokens=False)
    rows.append([specials[0], *text, specials[1], *extra, specials[2]])
    return rows


@torch.no_grad()
def _logits(model, rows: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([r])).logits[0].float() for r in rows]


@torch.no_grad()
def greedy(model, prompt: list[int], steps: int, stop: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens (argmax, no sampling settings involved) and the top-2 logit margin at each step."""
    ids = list(prompt)
    out, margins = [], []
    for _ in range(steps):  # full forward each step: short prompts, and no cache API to depend on
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        token = int(top.indices[0])
        out.append(token)
        margins.append(float(top.values[0] - top.values[1]))
        if token in stop:
            break
        ids.append(token)
    return out, margins


def _sample_prompt(tokenizer) -> list[int]:
    if tokenizer.chat_template:
        return _render(tokenizer, [{"role": "user", "content": SAMPLE_PROMPT}])
    return tokenizer.encode(SAMPLE_PROMPT, add_special_tokens=False)


def _load(model_dir: Path, gguf_path: Path | None):
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_path.name} if gguf_path else {}
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent if gguf_path else model_dir, dtype=torch.float32, **kwargs
    )
    return model.eval()


def compare_greedy(ref: list[int], got: list[int], margins: list[float], tol: float) -> dict[str, Any]:
    """Agreement of two greedy runs: the fraction of steps equal up to the first divergence, and whether that
    divergence is a near-tie in the source (top-2 margin within the parity tolerance)."""
    n = min(len(ref), len(got))
    first = next((i for i in range(n) if ref[i] != got[i]), None)
    same = first is None and len(ref) == len(got)
    if first is None and not same:
        first = n
    agree = (first if first is not None else len(ref)) / max(len(ref), 1)
    tie = first is not None and first < len(margins) and margins[first] <= tol
    return {
        "source": ref,
        "gguf": got,
        "same": same,
        "agreement": round(agree, 4),
        "first_divergence": first,
        "divergence_is_near_tie": tie,
    }


def verify_gguf(model_dir: Path, gguf_path: Path, tokenizer, *, gtype: str) -> dict[str, dict[str, Any]]:
    """Parity, greedy and tokenizer checks of `gguf_path` against `model_dir`; raises QwentuneError on a failure.
    Returns the report sections {parity, greedy, tokenizer}."""
    from ..patches import one_gguf_read

    with one_gguf_read():  # the config, tokenizer and weights below read one parsed GGUF header, not four
        return _verify(model_dir, gguf_path, tokenizer, gtype=gtype)


def _verify(model_dir: Path, gguf_path: Path, tokenizer, *, gtype: str) -> dict[str, dict[str, Any]]:
    from transformers import AutoTokenizer

    where = "gguf export check"
    gguf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    want = tokenizer.encode(ROUNDTRIP_TEXT, add_special_tokens=False)
    got_ids = gguf_tok.encode(ROUNDTRIP_TEXT, add_special_tokens=False)
    tok_report = {"text": ROUNDTRIP_TEXT, "same_ids": want == got_ids, "ids": want}
    if want != got_ids:
        raise QwentuneError(
            f"the GGUF tokenizer encodes the sample text differently ({got_ids[:12]}... vs {want[:12]}...)",
            where=where,
        )
    rows = parity_rows(tokenizer)
    prompt = _sample_prompt(tokenizer)
    stop = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")) if i is not None}
    source = _load(model_dir, None)
    ref = _logits(source, rows)
    ref_tokens, margins = greedy(source, prompt, GREEDY_TOKENS, stop)
    del source
    written = _load(model_dir, gguf_path)
    got = _logits(written, rows)
    got_tokens, _ = greedy(written, prompt, GREEDY_TOKENS, stop)
    del written
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    scale = max(float(r.abs().max()) for r in ref)
    tol = gguf_tolerance(gtype, scale)
    parity = {
        "max_abs_diff": diff,
        "tolerance": tol,
        "reference_max_abs_logit": scale,
        "rows": len(rows),
        "tokens": sum(len(r) for r in rows),
    }
    print(f"[qwentune export] {gtype} parity: max |Δlogit| = {diff:.3g} (tolerance {tol:.3g}, scale {scale:.3g})")
    if not diff <= tol:
        raise QwentuneError(
            f"GGUF ({gtype}) logits differ from the source: max |Δlogit| {diff:.4g} > tolerance {tol:.4g}",
            where=where,
            hint="no GGUF was written",
        )
    greedy_report = compare_greedy(ref_tokens, got_tokens, margins, tol)
    greedy_report |= {"prompt": prompt, "margins": [round(m, 4) for m in margins], "tolerance": tol}
    print(f"[qwentune export] greedy agreement {greedy_report['agreement']:.0%} over {len(ref_tokens)} tokens")
    if gtype != "q8_0" and not greedy_report["same"] and not greedy_report["divergence_is_near_tie"]:
        raise QwentuneError(
            f"GGUF ({gtype}) greedy tokens differ from the source at step {greedy_report['first_divergence']}",
            where=where,
            hint="no GGUF was written",
        )
    return {"parity": parity, "greedy": greedy_report, "tokenizer": tok_report}
