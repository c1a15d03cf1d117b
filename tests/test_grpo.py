"""GRPO end to end on tiny models: prompts exactly as eval renders them (and TRL generates from exactly those ids),
only the adapter trained, the frozen copy of a continued adapter as the KL reference, rewards and their parts in the
metrics, the plot and the card, a learnable reward rising, resume after SIGTERM, and the bad input refused."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from cli_in_process import run_main
from safetensors.torch import load_file, save_file
from tiny_models import shared_tokenizer, tiny_model_dir, tiny_training
from transformers import TrainerCallback

import qwentune
from qwentune.eval.evaluation import _prompt_ids, collect
from qwentune.rows.template import load_template

ROOT = Path(__file__).resolve().parents[1]
IM_END = 151645
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip


def weather(city: str) -> list[dict]:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    return [{"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": f"Sunny in {city}."}]  # fmt: skip


ROWS = [
    {"tools": TOOLS, "messages": weather("Paris")},  # two expected turns: a call, then an answer
    {"tools": TOOLS, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"tools": TOOLS, "messages": weather("Oslo")},
    {"tools": TOOLS, "messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},  # no tools: one no-call prompt
    {"messages": [{"role": "assistant", "content": "I speak first."}]},  # no turn answers a question
]  # fmt: skip
MAX_LENGTH = 300  # with max_completion_length 8: prompts up to 292 tokens; the 200-word one is over


@pytest.fixture(autouse=True)
def one_torch_thread():
    """A tiny model runs thousands of tiny ops a step, each waiting for both threads of the pool: on 2 cores shared
    with other work one thread is ~7× faster here (a GRPO step: 2.3 s against 16.7 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grpo_recipe(model_dir: Path, rows: Path, out: Path, **sections) -> dict:
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(rows)], "max_length": MAX_LENGTH},
        "method": "grpo",
        "grpo": {"num_generations": 4, "max_completion_length": 8, "rewards": {"tool_call": 1.0, "no_call": 1.0}},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": tiny_training(max_steps=2, per_device_batch_size=8, learning_rate=1e-2),  # 2 prompts × 4
        "output": {"dir": str(out), "merge": False, "sample_tokens": 4},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values) if isinstance(values, dict) else recipe.update({section: values})
    return recipe


def scaled_im_end_model(tmp_path: Path, scale: float) -> Path:
    """A tiny model whose <|im_end|> row (embedding and tied head) is `scale` × as long as it was."""
    model_dir = tiny_model_dir(tmp_path)
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    for key in state:
        if "embed_tokens" in key or "lm_head" in key:
            state[key][IM_END] *= scale
    save_file(state, str(path), metadata={"format": "pt"})
    return model_dir


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_prompts_are_evals_prompts_each_counted_and_never_cut(tmp_path):
    """One prompt per expected turn, the ids `qwentune eval --turns all` generates from; the over-long one and the row
    without a question are counted, never cut."""
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    model_dir = tiny_model_dir(tmp_path)
    prepared = qwentune.prepare(grpo_recipe(model_dir, data, tmp_path / "run"))
    items, _ = collect([data], turns="all")
    tok, template = shared_tokenizer(), load_template("qwen2.5-instruct")
    evals = [_prompt_ids(it, tok, template.text) for it in items if it.kind in ("tool_call", "no_call")]
    kept = [ids for ids in evals if len(ids) <= MAX_LENGTH - 8]
    assert len(evals) == 6 and len(kept) == 5  # eval scores the row without tools by its loss: not in these
    train = prepared.train
    assert train["prompt_input_ids"][:5] == kept  # the same ids, in row order
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in train["prompt"]] == train["prompt_input_ids"]
    references = [json.loads(r) for r in train["reference"]]
    assert [bool(r.get("tool_calls")) for r in references] == [True, False, False, True, False, False]
    assert json.loads(train["tools"][0]) == TOOLS and train["tools"][5] == ""
    assert train["prompt"][5].endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")  # the rendered generation prompt
    (report,) = [r.to_dict() for r in prepared.reports]
    assert report["rows"] == 6 and report["kept"] == 6 and report["total"] == 8
    assert report["skipped"] == {"over_length": 1, "bad_role_order": 1}
    assert report["examples"]["over_length"][0][0] == 4  # its line


@pytest.mark.slow
def test_grpo_continues_an_sft_adapter_trains_only_it_and_logs_rewards(tmp_path):
    """beta > 0 on a continued adapter: the KL reference is a frozen copy of it (trainable token rows included), the
    base never moves, TRL generates from exactly our prompt ids, the rewards and their parts reach the metrics, the
    plot and the card, and a reward function passed from Python is used."""
    model_dir = scaled_im_end_model(tmp_path, 0.1)  # <|im_end|> looks untrained: SFT makes its row trainable
    data = write_rows(tmp_path / "rows.jsonl", ROWS[:3])
    sft = qwentune.train(grpo_recipe(model_dir, data, tmp_path / "sft", method="sft", training={"max_steps": 1}))
    assert sft.metrics["trainable_tokens"]["made_trainable"] == [IM_END]

    seen: list = []

    def brevity(completion: str, reference: dict, tools: list | None):  # random replies differ in length
        seen.append((completion, reference, tools))
        return qwentune.eval.Reward(-len(completion) / 100, {"chars": float(len(completion))})

    recipe = grpo_recipe(
        model_dir, data, tmp_path / "grpo", model={"adapter": str(sft.adapter_dir)},
        grpo={"beta": 0.1, "num_generations": 2, "rewards": {"tool_call": 1.0, "no_call": 1.0, "format": 0.5}},
        training={"max_steps": 1, "per_device_batch_size": 4}, output={"merge": True, "sample_tokens": 2},
    )  # fmt: skip
    run = qwentune.setup(recipe, rewards={"brevity": brevity})
    model, trainer = run.trainer.model, run.trainer
    assert set(model.peft_config) == {"default", "ref"}
    params = dict(model.named_parameters())
    sft_tensors = load_file(str(sft.adapter_dir / "adapter_model.safetensors"))
    ref = {n: p.detach().clone() for n, p in params.items() if ".ref" in n}
    assert any("trainable_tokens_delta.ref" in n for n in ref) and not any(params[n].requires_grad for n in ref)
    for name, value in ref.items():  # the reference is the SFT adapter, its trainable token rows included
        saved = name.replace(".ref", "").removesuffix(".weight") + (".weight" if name.endswith(".weight") else "")
        assert torch.equal(sft_tensors[saved].to(value.dtype), value), name
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and all(".default" in n for n in trained)
    before = {n: p.detach().clone() for n, p in params.items()}
    prompts: list = []
    generate = trainer._generate_single_turn

    def spy(prompt_ids, *args, **kwargs):
        prompts.extend(list(map(list, prompt_ids)))
        return generate(prompt_ids, *args, **kwargs)

    trainer._generate_single_turn = spy
    result = run.train()

    after = dict(model.named_parameters())
    changed = {n for n in before if n in after and not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trained  # only the continued adapter moved; its frozen copy and the base did not
    assert len(prompts) == 4 and all(p in run.data.train["prompt_input_ids"] for p in prompts)  # our exact ids
    assert prompts[0] == prompts[1] and prompts[2] == prompts[3]  # once per completion of the group
    assert len(seen) == 4 and all(r["role"] == "assistant" and t in (TOOLS, None) for _, r, t in seen)

    (row,) = [r for r in log_rows(result.run_dir) if "reward" in r]
    for key in (
        "rewards/tool_call/mean",
        "rewards/no_call/mean",
        "rewards/format/mean",
        "rewards/brevity/mean",
        "rewards/format/stops",
        "rewards/format/blocks",
        "rewards/brevity/chars",
    ):
        assert key in row, key  # fmt: skip
    assert row["frac_reward_zero_std"] == 0 and row["grad_norm"] > 0  # brevity tells every group's replies apart
    assert row["kl"] == pytest.approx(0, abs=1e-6)  # the policy is its reference copy before the first update
    grpo = result.metrics["grpo"]
    assert grpo["rewards"] == {"tool_call": 1.0, "no_call": 1.0, "format": 0.5, "brevity": 1.0}
    assert grpo["reference"].startswith("a frozen copy of the adapter")
    assert grpo["measured"]["zero-variance groups (mean share)"] == 0 and len(grpo["measured"]["format/stops"]) == 2
    assert (result.run_dir / "loss.png").is_file()
    assert not (result.adapter_dir / "ref").exists()  # only the trained adapter is saved
    card = (result.merged_dir / "README.md").read_text()
    assert "(GRPO)" in card and "0.5 × format" in card and "| GRPO zero-variance groups (mean share) | 0 |" in card
    assert "| GRPO tool_call/names, first → last step | 0 → 0 |" in card and "5 of 5 prompts kept" in card
    assert result.metrics["merge"]["max_abs_diff"] <= result.metrics["merge"]["tolerance"]


@pytest.mark.slow
def test_a_learnable_reward_rises_within_a_few_steps(tmp_path):
    """A tiny model whose <|im_end|> is reachable (its row 10× as long; top-k 20 sampling, passed through trainer:)
    stops within 6 tokens in under half of its samples; the format reward (0.5 for stopping) teaches it to stop.
    With gradient checkpointing, which TRL turns off to generate and back on to train."""
    model_dir = scaled_im_end_model(tmp_path, 10.0)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
            for q in ("What is 2+2?", "Name a colour.", "Say hi.", "Count to three.")]  # fmt: skip
    recipe = grpo_recipe(
        model_dir, write_rows(tmp_path / "rows.jsonl", rows), tmp_path / "run",
        grpo={"num_generations": 8, "max_completion_length": 6, "rewards": {"format": 1.0}},
        training={"max_steps": 3, "per_device_batch_size": 16, "learning_rate": 3e-3, "gradient_checkpointing": True},
        trainer={"top_k": 20},
    )  # fmt: skip
    result = qwentune.train(recipe)
    steps = [r for r in log_rows(result.run_dir) if "reward" in r]
    stops = [r["rewards/format/stops"] for r in steps]
    assert stops[0] < 0.75 and stops[-1] >= stops[0] + 0.2, stops
    assert steps[-1]["reward"] > steps[0]["reward"]
    assert steps[0]["frac_reward_zero_std"] < 1  # the groups disagree: there is something to learn from


@pytest.mark.slow
def test_grpo_resumes_after_sigterm_to_the_same_adapter(tmp_path):
    """SIGTERM (sent by the process to itself during step 2): the step finishes, is checkpointed, the run stops with
    exit code 143; --resume logs every step once and ends with the adapter an uninterrupted run ends with, bit for
    bit (the sampling too: the RNG state comes back with the checkpoint)."""
    model_dir = scaled_im_end_model(tmp_path, 10.0)  # stops now and then: the format reward varies, the adapter moves
    rows = [{"messages": [{"role": "user", "content": f"{n}+{n}?"}, {"role": "assistant", "content": str(2 * n)}]}
            for n in range(4)]  # fmt: skip
    values = grpo_recipe(
        model_dir, write_rows(tmp_path / "rows.jsonl", rows), tmp_path / "cut",
        grpo={"num_generations": 4, "max_completion_length": 4, "rewards": {"format": 1.0}},
        training={"max_steps": 3, "save_steps": 1}, trainer={"top_k": 20},
    )  # fmt: skip

    class SigtermInStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    run = qwentune.setup(values)
    run.trainer.add_callback(SigtermInStep2())
    with pytest.raises(qwentune.QwentuneError, match="stopped after step 2") as stopped:
        run.train()
    assert stopped.value.exit_code == 128 + signal.SIGTERM and "--resume" in stopped.value.hint
    cut = tmp_path / "cut"
    assert [r["step"] for r in log_rows(cut) if "reward" in r] == [1, 2] and not (cut / "adapter").exists()

    qwentune.train(values, ["training.resume=true"])
    assert [r["step"] for r in log_rows(cut) if "reward" in r] == [1, 2, 3]  # every step logged once

    whole = qwentune.train(values, [f"output.dir={tmp_path / 'whole'}"])  # the same run, uninterrupted
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # trained: B left its zero init


def test_bad_grpo_input_is_one_line_exit_2(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    data = write_rows(tmp_path / "rows.jsonl", ROWS[:3])
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(yaml.safe_dump(grpo_recipe(model_dir, data, tmp_path / "run")))

    def one_line(argv: list[str], *needles: str) -> str:
        code, err = run_main(argv)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert all(n in lines[0] for n in needles), lines[0]
        return lines[0]

    one_line(["validate", str(recipe), "grpo.rewards={tool_cal: 1.0}"],
             "'grpo.rewards' names an unknown reward 'tool_cal'", "did you mean 'tool_call'?")  # fmt: skip
    one_line(["train", str(recipe), "grpo.rewards.formt=1"], "unknown reward 'formt'", "did you mean 'format'?")
    one_line(["validate", str(recipe), "grpo.num_generations=1"], "'grpo.num_generations' must be ≥ 2, got 1")
    one_line(["validate", str(recipe), "grpo.num_generations=3"], "does not hold whole groups")
    one_line(["validate", str(recipe), "grpo.temperature=0"], "'grpo.temperature' must be > 0")
    one_line(["validate", str(recipe), "grpo.rewards.format=x"], "'grpo.rewards.format' must be float")
    one_line(["validate", str(recipe), "trainer.beta=0.1"], "'trainer.beta' is set by qwentune", "use grpo.beta")
    no_turn = write_rows(tmp_path / "no_turn.jsonl", [ROWS[5], {"messages": [{"role": "user", "content": "Hi"}]}])
    one_line(["train", str(recipe), f"data.train=[{no_turn}]", f"output.dir={tmp_path / 'r2'}"],
             "no prompt with a reference turn in data.train")  # fmt: skip
    assert run_main(["validate", str(recipe)])[0] == 0
