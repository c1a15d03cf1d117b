"""The LM head we train through never materializes the (tokens × 151,936) logits, and our CPU tiles change neither the
loss nor its gradients: against full logits + F.cross_entropy, and against TRL's own CPU fold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

VOCAB = 151936  # the full Qwen2.5 vocabulary; a small hidden size keeps the products cheap
HIDDEN = 64
OUTPUTS = ("log_probs", "entropy", "is_top1")  # what TRL's SFTTrainer asks the fused head for


def _trl_as_shipped():
    """TRL's fused-head function from a fresh copy of its module, executed from TRL's own file: whatever the imported
    module holds now (after any test before this one), this copy folds with TRL's own `_forward_tile`."""
    import importlib.util

    import trl.kernels.chunked_logprob as chunked

    spec = importlib.util.spec_from_file_location(chunked.__name__, chunked.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.ChunkedLogProbFunction is not chunked.ChunkedLogProbFunction
    return fresh.ChunkedLogProbFunction


@pytest.fixture
def trl_head():
    """TRL's fused-head function as TRL ships it, and `patched()`: the one training uses inside
    `patches.lean_cpu_fold` (entered for the test, restored after it)."""
    import trl.trainer.utils as trl_utils

    from qwentune.patches import internals as patches

    original = _trl_as_shipped()
    with patches.lean_cpu_fold():
        function = trl_utils._ChunkedLogProbFunction

        def patched():
            assert function.__qualname__.endswith("NarrowTilesOnCPU")  # the lean fold is installed
            return function

        yield original, patched


def _inputs(tokens: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=g, dtype=dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (tokens,), generator=g)
    return hidden, weight, targets


def _fused(function, hidden, weight, targets, outputs=OUTPUTS, autocast=False):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        log_probs, entropy, _, mean_logits, is_top1 = function.apply(
            h, w, None, targets, 1.0, 32768, None, 1.0, outputs
        )
    loss = -log_probs.sum() / len(targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad, entropy.detach(), is_top1, mean_logits


def _naive(hidden, weight, targets):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logits = h @ w.T
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    with torch.no_grad():
        log_p = torch.log_softmax(logits, -1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        is_top1 = logits.argmax(-1) == targets
    return loss.detach(), h.grad, w.grad, entropy, is_top1


def test_lean_cpu_head_equals_full_logits_cross_entropy_and_trl(trl_head):
    original, patched = trl_head
    hidden, weight, targets = _inputs(600)
    # a few targets that are the argmax, one of them tied with an earlier column (first maximum wins)
    weight[targets[0]] = hidden[0] * 3
    weight[targets[1]] = hidden[1] * 3
    weight[targets[1] - 7] = weight[targets[1]]
    trl_out = _fused(original, hidden, weight, targets)
    ours = _fused(patched(), hidden, weight, targets)
    naive = _naive(hidden, weight, targets)

    for reference in (naive, trl_out):
        torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-6)  # loss
        torch.testing.assert_close(ours[1], reference[1], rtol=1e-4, atol=1e-7)  # d loss / d hidden
        torch.testing.assert_close(ours[2], reference[2], rtol=1e-4, atol=1e-7)  # d loss / d head weight
        torch.testing.assert_close(ours[3], reference[3], rtol=1e-4, atol=1e-4)  # entropy (a metric)
        assert torch.equal(ours[4], reference[4])  # is_top1 (token accuracy)
    assert ours[4][0] and not ours[4][1]  # the tie with an earlier column does not count as top-1


def test_lean_cpu_head_keeps_dpo_outputs_and_bf16_rounding(trl_head):
    """DPO also asks for the mean logit; under bf16 autocast (CPU bf16 training) the tile is rounded to bf16 before
    the gradient products, in TRL's fold as in ours."""
    original, patched = trl_head
    hidden, weight, targets = _inputs(300, seed=1)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    theirs = _fused(original, hidden, weight, targets, outputs, autocast=True)
    ours = _fused(patched(), hidden, weight, targets, outputs, autocast=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(ours[5], theirs[5], rtol=1e-5, atol=1e-5)  # mean logits
    assert torch.equal(ours[4], theirs[4])


def _peak_tensor_bytes(fn, fake: bool) -> int:
    """Peak bytes of live tensor storage while `fn` runs forward and backward, counted by torch's own dispatch-level
    tracker (every storage created by an op is counted until it is freed). Under FakeTensorMode the same ops run on
    shapes only, so a path that would need ~14 GiB is measured without allocating it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    if fake:
        with FakeTensorMode():
            inputs = fn.make()
            tracker.track_external(*inputs)
            with tracker:
                fn(*inputs)
    else:
        inputs = fn.make()
        tracker.track_external(*inputs)
        with tracker:
            fn(*inputs)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.slow
def test_fused_head_peak_memory_for_8192_tokens_is_under_10_percent_of_full_logits(trl_head):
    """Loss + backward over 8,192 tokens, every one trained, frozen head (LoRA). Ours: measured running for real.
    Full logits + F.cross_entropy: the same tracker on fake tensors (its real peak is ~14 GiB)."""
    _, patched = trl_head
    function = patched()
    tokens = 8192

    def make():
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(tokens, HIDDEN, generator=g).requires_grad_(True)
        weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.02
        return hidden, weight, torch.randint(0, VOCAB, (tokens,), generator=g)

    def naive(hidden, weight, targets):
        F.cross_entropy(hidden @ weight.T, targets).backward()

    def ours(hidden, weight, targets):
        log_probs = function.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, OUTPUTS)[0]
        (-log_probs.sum() / tokens).backward()

    naive.make = ours.make = make
    logits_bytes = tokens * VOCAB * 4
    naive_peak = _peak_tensor_bytes(naive, fake=True)
    ours_peak = _peak_tensor_bytes(ours, fake=False)
    assert naive_peak >= 2 * logits_bytes  # the tracker sees the logits and their softmax
    assert ours_peak > tokens * HIDDEN * 4  # and the tiles inside TRL's autograd function
    assert ours_peak <= 0.10 * naive_peak, (ours_peak / 2**20, naive_peak / 2**20)
