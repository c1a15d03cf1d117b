"""Training runs: one script per method (`sft`, `dpo`, `grpo` with its prompts and rewards: `grpo_prompts`,
`grpo_rewards`), what they share (`steps`), the configured Run of
`qwentune.setup` (`run`), the run dir and its lock (`rundir`), resume after preemption (`resume`), metrics,
results, the inputs every job starts from (`inputs`) and `qwentune validate`.
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "dpo": ("setup_dpo",),
        "grpo": ("check_grpo_recipe", "setup_grpo"),
        "inputs": ("prepare_inputs",),
        "results": ("TrainResult",),
        "run": ("Run",),
        "rundir": ("owned_run_dir", "run_dir_for", "run_state"),
        "sft": ("setup_sft",),
        "steps": ("finish_trained_run",),
        "validate": ("validate_recipe",),
    },
)
