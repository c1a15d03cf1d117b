"""qwentune: fine-tune Qwen models with LoRA/QLoRA, exact chat-template masks and merged checkpoints.

import qwentune
recipe = qwentune.load_recipe("recipes/qwen2.5-0.5b-instruct/sft_lora.yaml", ["training.max_steps=10"])
print(qwentune.preview(recipe, rows=1))
result = qwentune.train(recipe)          # result.adapter_dir, result.merged_dir, result.metrics
# or: run = qwentune.setup(recipe); run.trainer.add_callback(...); result = run.train()
# in-memory data: qwentune.train(recipe, train_data=dataset_or_list_of_dicts)
print(result.generate("Hello").text)     # result.load() -> (model, tokenizer)
scores = qwentune.evaluate(["offline:qwen2.5-coder-0.5b-instruct", result.merged_dir], "data/tool_calls_eval.jsonl")
print(scores.table())                    # models as columns, with deltas
"""

from .api import evaluate, export_gguf, merge, prepare, preprocess, preview, setup, start_server, train
from .errors import BadRow, QwentuneError
from .recipe import Recipe, load_recipe
from .training import Run, TrainResult

__all__ = [
    "load_recipe",
    "Recipe",
    "prepare",
    "preprocess",
    "preview",
    "setup",
    "train",
    "merge",
    "export_gguf",
    "evaluate",
    "start_server",
    "Run",
    "TrainResult",
    "QwentuneError",
    "BadRow",
]
__version__ = "0.1.0"
