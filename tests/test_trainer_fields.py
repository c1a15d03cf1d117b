"""The recipe's `trainer:` section: TRL config fields passed through, checked up front against the installed
SFTConfig / DPOConfig (unknown → did-you-mean, owned by qwentune → the recipe key, wrong type → refused)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_model_dir, tiny_training

import qwentune
from qwentune.errors import QwentuneError
from qwentune.recipe.load import load_recipe
from qwentune.recipe.trainer_fields import build_config
from qwentune.training.resume import recipe_changes
from qwentune.training.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"}, "data": {"train": "data/tool_calls.jsonl"}}
DPO = {**MINIMAL, "method": "dpo", "data": {"train": "data/preferences.jsonl", "format": "preference"}}


def qwentune_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwentune", *args], cwd=cwd, capture_output=True, text=True)


def test_trainer_fields_pass_through_typed_and_are_recorded_in_the_recipe():
    recipe = load_recipe({**MINIMAL, "trainer": {"neftune_noise_alpha": 5, "torch_compile": False}})
    assert recipe.trainer == {"neftune_noise_alpha": 5.0, "torch_compile": False}
    assert isinstance(recipe.trainer["neftune_noise_alpha"], float)
    again = load_recipe(MINIMAL, ["trainer.neftune_noise_alpha=5", "trainer.torch_compile=false"])
    assert again.trainer == recipe.trainer
    # a change of a pass-through field is a recipe change (resume refuses it)
    recorded = yaml.safe_dump(load_recipe(MINIMAL).to_dict())
    assert recipe_changes(recorded, recipe) == [
        "  trainer.neftune_noise_alpha: '(absent)' → 5.0",
        "  trainer.torch_compile: '(absent)' → False",
    ]


def test_unknown_field_is_refused_with_did_you_mean_and_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "trainer": {"neftune_noise_alfa": 5}}, sort_keys=False))
    with pytest.raises(QwentuneError) as err:
        load_recipe(path)
    text = str(err.value)
    assert f"{path}:6: unknown key 'trainer.neftune_noise_alfa'" in text
    assert "did you mean 'neftune_noise_alpha'?" in text
    with pytest.raises(QwentuneError, match=r"command line: unknown key 'trainer.use_ligerkernel' in override"):
        load_recipe(MINIMAL, ["trainer.use_ligerkernel=true"])


def test_validate_lists_the_fields_passed_to_trl(tmp_path):
    path = tmp_path / "r.yaml"
    recipe = {**MINIMAL, "data": {"train": str(ROOT / "data/tool_calls.jsonl")}, "trainer": {"neftune_noise_alpha": 5}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert "  trainer: neftune_noise_alpha=5.0 (passed to TRL SFTConfig)" in validate_recipe(path)


def test_unknown_field_from_the_cli_is_one_line_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    recipe = {**MINIMAL, "data": {"train": str(ROOT / "data/tool_calls.jsonl")}, "trainer": {"use_liger_kernal": True}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = qwentune_cli("validate", str(path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()  # library notices on importing TRL (bitsandbytes, kernels) hidden
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"{path}:6" in lines[0] and "'trainer.use_liger_kernal'" in lines[0]
    assert "did you mean 'use_liger_kernel'?" in lines[0]


@pytest.mark.parametrize(
    "field, value, instead",
    [
        ("learning_rate", 1e-3, "training.learning_rate"),
        ("per_device_train_batch_size", 4, "training.per_device_batch_size"),
        ("max_length", 512, "data.max_length"),
        ("packing", True, "sft.packing"),
        ("report_to", "mlflow", "logging.report_to"),
        ("optim", "adamw_8bit", "training.optim"),
    ],
)
def test_fields_qwentune_sets_are_refused_naming_the_recipe_key(field, value, instead):
    with pytest.raises(QwentuneError, match=rf"'trainer.{field}' is set by qwentune.*use {instead}"):
        load_recipe({**MINIMAL, "trainer": {field: value}})


def test_wrong_types_are_refused():
    with pytest.raises(QwentuneError, match=r"'trainer.neftune_noise_alpha' must be float or null, got str 'lots'"):
        load_recipe({**MINIMAL, "trainer": {"neftune_noise_alpha": "lots"}})
    with pytest.raises(QwentuneError, match=r"'trainer.use_liger_kernel' must be bool"):
        load_recipe({**MINIMAL, "trainer": {"use_liger_kernel": "yes"}})
    with pytest.raises(QwentuneError, match=r"'trainer.torch_empty_cache_steps' must be int or null"):
        load_recipe({**MINIMAL, "trainer": {"torch_empty_cache_steps": 2.5}})
    with pytest.raises(QwentuneError, match=r"'trainer.hub_strategy' must be one of.*did you mean 'every_save'"):
        load_recipe({**MINIMAL, "trainer": {"hub_strategy": "every_sav"}})
    with pytest.raises(QwentuneError, match=r"'trainer.lr_scheduler_kwargs' must be mapping"):
        load_recipe({**MINIMAL, "trainer": {"lr_scheduler_kwargs": [1, 2]}})
    with pytest.raises(QwentuneError, match=r"'trainer' must be mapping"):
        load_recipe({**MINIMAL, "trainer": ["neftune_noise_alpha"]})


def test_liger_kernel_needs_the_package():
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        assert load_recipe({**MINIMAL, "trainer": {"use_liger_kernel": True}}).trainer == {"use_liger_kernel": True}
    else:
        with pytest.raises(
            QwentuneError, match=r"'trainer.use_liger_kernel' is true but liger-kernel is not installed"
        ):
            load_recipe({**MINIMAL, "trainer": {"use_liger_kernel": True}})
    assert load_recipe({**MINIMAL, "trainer": {"use_liger_kernel": False}}).trainer == {"use_liger_kernel": False}


def test_the_section_is_checked_against_the_config_of_the_method():
    # disable_dropout is a DPOConfig field: accepted for dpo, refused for sft with the reason
    assert load_recipe({**DPO, "trainer": {"disable_dropout": False}}).trainer == {"disable_dropout": False}
    with pytest.raises(QwentuneError, match=r"'trainer.disable_dropout'.*a DPOConfig field.*method is sft"):
        load_recipe({**MINIMAL, "trainer": {"disable_dropout": False}})
    # SFTConfig.loss_type (nll | dft) is passed through for sft; DPOConfig.loss_type is dpo.loss_type
    assert load_recipe({**MINIMAL, "trainer": {"loss_type": "dft"}}).trainer == {"loss_type": "dft"}
    with pytest.raises(QwentuneError, match=r"'trainer.loss_type' is set by qwentune.*use dpo.loss_type"):
        load_recipe({**DPO, "trainer": {"loss_type": "ipo"}})


def test_a_combination_trl_refuses_is_one_qwentune_error(tmp_path):
    from trl import SFTConfig

    passed = {"load_best_model_at_end": True}  # needs matching eval and save strategies
    settings = dict(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", save_strategy="steps", **passed)
    with pytest.raises(QwentuneError, match=r"TRL's SFTConfig refused these settings: --load_best_model_at_end") as e:
        build_config(SFTConfig, passed, **settings)
    assert e.value.where == "trainer.load_best_model_at_end" and "\n" not in str(e.value)
    assert build_config(SFTConfig, {}, output_dir=str(tmp_path), use_cpu=True).output_dir == str(tmp_path)


@pytest.mark.slow
def test_neftune_run_trains_and_the_noise_reaches_the_trainer(tmp_path):
    """trainer.neftune_noise_alpha reaches TRL: the same 2 steps with and without it give different training losses
    (the embeddings get noise only in training), both finite, and the run dir's recipe.yaml records the field."""
    model_dir = tiny_model_dir(tmp_path)

    def run(name: str, trainer: dict) -> tuple[list[float], Path]:
        result = qwentune.train(
            {
                "model": {"source": str(model_dir)},
                "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 4, "max_length": 128},
                "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                "training": tiny_training(),
                "output": {"dir": str(tmp_path / name), "merge": False, "sample_tokens": 0},
                "trainer": trainer,
            }
        )
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], result.run_dir

    plain, _ = run("plain", {})
    noisy, run_dir = run("neftune", {"neftune_noise_alpha": 5})
    assert len(noisy) == 2 and all(math.isfinite(x) for x in noisy + plain)
    assert noisy[0] != pytest.approx(plain[0], rel=1e-4)  # same rows, seed and weights: only the noise differs
    recorded = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recorded["trainer"] == {"neftune_noise_alpha": 5.0}
