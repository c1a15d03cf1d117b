"""Special tokens the model never learned.

A token whose embedding and output rows were never trained (e.g. `<tool_call>` in Qwen2.5-Coder-0.5B-Instruct: its
output row has cosine > 0.99 with ~3,200 never-used rows and 0.63× the median norm) cannot be produced by LoRA on
the linear layers alone: the model learns the call's JSON but writes another token where `<tool_call>` belongs.
We find such tokens among those the labels train, and make exactly their rows trainable (PEFT trainable tokens:
`peft.train_new_tokens: auto`, the default; `off` only reports them). With `auto`, in SFT, each such row also starts
from the mean of the rows of the text it stands for (`<tool_call>` → `<`, `tool`, `_call`, `>`), in both matrices:
on the offline real model that alone takes `<tool_call>` from NLL 23.8 (rank ~110,000) to 8.1 (rank ~20) at the
call position, `</tool_call>` from 20.8 to 6.7, and the mean NLL of all trained tokens from 1.90 to 1.03 (4 held-out
tool-call rows, before any training). PEFT's token rows hold whole values, so the start is part of the adapter and
the merge needs nothing extra.

Two entry points:

* `prepare_new_token_rows` — training: the check on the loaded base model, printed, saved as
  ``run_dir/special_tokens.json`` and in the run metrics; with ``auto`` the flagged ids become trainable and (SFT)
  their rows in the base model are rewritten to start from their text.
* `flagged_in_model_files` — `qwentune preview`: the same check on the embedding/lm_head tensors read straight from
  the model dir's safetensors files (nothing else is loaded).

PEFT's trainable-token wrapper runs, while a trainer trains, without its full-vocabulary copy of the matrix and
without a full-vocabulary weight gradient in TRL's fused head: `patches.lean_token_rows` (math in token_rows.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write_json
from ..logs import is_main_process, log

# A row is "untrained" when it is one of a cluster of near-identical rows (never-used tokens collapse together
# during pre-training) or far shorter than the typical row.
NEAR_COSINE = 0.99
NEAR_COUNT = 8
NORM_RATIO = 0.5
_CHUNK_ROWS = 16384  # rows upcast to fp32 at a time: the check never copies a whole (151,936 × hidden) matrix


@dataclass
class RowCheck:
    token_id: int
    token: str
    matrix: str  # "input" | "output" | "tied" (one matrix serves both)
    norm_ratio: float  # row norm / median row norm of the matrix
    near_rows: int  # other rows with cosine > NEAR_COSINE
    flagged: bool


@dataclass
class TokenCheck:
    """Which special tokens the labels train, how their rows look, and which rows were made trainable."""

    trained_special: list[int] = field(default_factory=list)
    rows: list[RowCheck] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # made trainable
    initialised: dict[int, list[int]] = field(default_factory=dict)  # made-trainable id -> its text's token ids
    measure: str = (
        f"flag a row if > {NEAR_COUNT} other rows have cosine > {NEAR_COSINE} with it, "
        f"or its norm < {NORM_RATIO} × the median row norm"
    )

    @property
    def flagged(self) -> list[int]:
        return sorted({r.token_id for r in self.rows if r.flagged})

    def to_dict(self) -> dict:
        return {
            "measure": self.measure,
            "trained_special_tokens": self.trained_special,
            "flagged": self.flagged,
            "made_trainable": self.ids,
            "initialised_from_text": {str(k): v for k, v in self.initialised.items()},
            "rows": [r.__dict__ for r in self.rows],
        }

    def summary(self) -> str:
        if not self.trained_special:
            return "no special tokens in the trained labels"
        lines = [f"special tokens in the trained labels: {len(self.trained_special)} ({self.measure})"]
        for r in self.rows:
            mark = "UNTRAINED" if r.flagged else "ok"
            lines.append(
                f"  {r.token!r:>16} id {r.token_id} {r.matrix:6} row: norm {r.norm_ratio:.2f}× median, "
                f"{r.near_rows} near-identical rows → {mark}"
            )
        if self.ids:
            lines.append(f"  made trainable (embed_tokens and lm_head rows): {self.ids}")
        names = {r.token_id: r.token for r in self.rows}
        for tid, src in self.initialised.items():
            lines.append(f"  {names.get(tid, tid)!r} starts from the mean of the rows of its text (ids {src})")
        return "\n".join(lines)


def special_token_ids(tokenizer) -> set[int]:
    """Added and special tokens (`<|im_end|>`, `<tool_call>`, …): the ones whose rows may never have been trained."""
    return {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})} | {
        int(i) for i in getattr(tokenizer, "all_special_ids", [])
    }


def trained_special_tokens(dataset, specials: set[int]) -> list[int]:
    """The ids of `specials` that occur in trained positions: SFT `labels`, or DPO chosen/rejected completions."""
    names = ["labels"] if "labels" in dataset.column_names else ["chosen_input_ids", "rejected_input_ids"]
    names = [n for n in names if n in dataset.column_names]
    if not names or not len(dataset):
        return []
    wanted = np.array(sorted(specials), dtype=np.int64)
    seen: set[int] = set()
    # Arrow batches (respecting select/shuffle indices), never Python lists per row; memory bounded by the batch.
    for batch in dataset.select_columns(names).with_format("arrow").iter(batch_size=8192):
        for name in names:
            values = batch[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            seen.update(int(t) for t in np.unique(values[np.isin(values, wanted)]))
    return sorted(seen)


@torch.no_grad()
def check_rows(matrix: torch.Tensor, token_ids: list[int], name: str, tokenizer) -> list[RowCheck]:
    """Norm ratio and near-identical-row count of each of `token_ids` in `matrix` (any float dtype and device;
    fp32 math, `_CHUNK_ROWS` rows at a time)."""
    if not token_ids:
        return []
    weight = matrix.detach()
    targets = weight[torch.tensor(token_ids, device=weight.device)].float()
    target_norms = targets.norm(dim=1)
    target_unit = targets / target_norms.clamp(min=1e-12)[:, None]
    norms = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    near = torch.zeros(len(token_ids), dtype=torch.long, device=weight.device)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        block = weight[start : start + _CHUNK_ROWS].float()
        block_norms = block.norm(dim=1)
        norms[start : start + block.shape[0]] = block_norms
        cos = (block @ target_unit.T) / block_norms.clamp(min=1e-12)[:, None]
        near += (cos > NEAR_COSINE).sum(dim=0)
    near -= (target_norms > 0).long()  # a non-zero row is near itself; a zero row is near nothing
    median = norms.median().clamp(min=1e-12)
    checks = []
    for i, tid in enumerate(token_ids):
        ratio = float(target_norms[i] / median)
        count = int(near[i])
        flagged = count > NEAR_COUNT or ratio < NORM_RATIO
        checks.append(RowCheck(tid, tokenizer.convert_ids_to_tokens(tid), name, round(ratio, 3), count, flagged))
    return checks


def check_matrices(
    input_matrix: torch.Tensor, output_matrix: torch.Tensor | None, token_ids: list[int], tokenizer
) -> list[RowCheck]:
    """The check on both matrices; `output_matrix` None means tied (one matrix is both)."""
    if output_matrix is None:
        return check_rows(input_matrix, token_ids, "tied", tokenizer)
    return check_rows(input_matrix, token_ids, "input", tokenizer) + check_rows(
        output_matrix, token_ids, "output", tokenizer
    )


def _output_matrix(model) -> torch.Tensor | None:
    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        return None  # tied: the input check covers it
    weight = head.weight
    return weight if weight.dtype.is_floating_point and weight.dim() == 2 else None


def check_tokens(model, tokenizer, dataset) -> TokenCheck:
    specials = special_token_ids(tokenizer)
    trained = trained_special_tokens(dataset, specials)
    result = TokenCheck(trained_special=trained)
    if trained:
        result.rows = check_matrices(model.get_input_embeddings().weight, _output_matrix(model), trained, tokenizer)
    return result


def prepare_new_token_rows(
    model, tokenizer, dataset, *, train_new_tokens: str, init_from_text: bool, run_dir: Path | None = None
) -> TokenCheck:
    """The check, printed and saved (`run_dir/special_tokens.json`). With `train_new_tokens` "auto" the flagged ids
    are returned to be made trainable (`TokenCheck.ids`) and, with `init_from_text`, their rows in `model` are
    rewritten in place to start from their text (`init_rows_from_text`); "off" only reports them."""

    result = check_tokens(model, tokenizer, dataset)
    if train_new_tokens == "auto":
        result.ids = result.flagged
        if init_from_text:
            result.initialised = init_rows_from_text(model, tokenizer, result.ids)
    log(result.summary())
    if result.flagged and not result.ids:
        log("flagged rows stay frozen (peft.train_new_tokens: off): the model may not learn to emit these tokens")
    if run_dir is not None and is_main_process():
        atomic_write_json(run_dir / "special_tokens.json", result.to_dict())
    return result


def text_token_ids(tokenizer, token_id: int) -> list[int]:
    """The ids the token's text gets as plain text (`<tool_call>` → `<`, `tool`, `_call`, `>`); [] when the
    tokenizer has no fast backend to split it with."""
    text = tokenizer.convert_ids_to_tokens(token_id)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not text:
        return []
    pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
    ids = [t.id for piece, _ in pieces for t in backend.model.tokenize(piece)]
    specials = special_token_ids(tokenizer)
    return [i for i in ids if i not in specials]


@torch.no_grad()
def init_rows_from_text(model, tokenizer, token_ids: list[int]) -> dict[int, list[int]]:
    """Set each token's input (and untied output) row of the base model, in place, to the mean of the rows of its
    text. Call before PEFT wraps the model: the trainable rows start from these values (PEFT copies them; the rows
    in the saved adapter are whole values, so the base on disk + adapter is still exactly the trained model)."""
    matrices = [model.get_input_embeddings().weight]
    output = _output_matrix(model)
    if output is not None:
        matrices.append(output)
    done: dict[int, list[int]] = {}
    for tid in token_ids:
        source = [i for i in text_token_ids(tokenizer, tid) if i < matrices[0].shape[0]]
        if not source:
            continue
        for weight in matrices:
            weight[tid] = weight[source].float().mean(dim=0).to(weight.dtype)
        done[tid] = source
    return done


# --- the same check from the files (preview: no model is loaded) ---------------------------------------------


def _tied(config: dict) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (sharded via the index, or every *.safetensors file)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), path))
    return names


def _pick(names: dict[str, Path], suffix: str) -> str | None:
    """The language model's tensor ending in `suffix` (shortest name: `model.embed_tokens.weight` over a vision
    tower's or a draft head's)."""
    found = sorted((n for n in names if n == suffix or n.endswith("." + suffix)), key=len)
    return found[0] if found else None


def embedding_matrices(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The input embedding and (untied) output matrices, read from the safetensors files of a model dir; output None
    when tied. None when the dir has no safetensors with an input embedding (e.g. .bin only)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    names = _tensor_files(model_dir)
    embed = _pick(names, "embed_tokens.weight")
    if embed is None:
        return None
    head = None if _tied(config) else _pick(names, "lm_head.weight")

    def read(name: str) -> torch.Tensor:
        with safe_open(str(names[name]), framework="pt") as f:
            return f.get_tensor(name)

    return read(embed), (read(head) if head is not None else None)


def check_model_files(model_dir: Path, tokenizer, token_ids: list[int] | None = None) -> list[RowCheck] | None:
    """The row check for `token_ids` (default: every special/added token) from the model dir's files."""
    matrices = embedding_matrices(model_dir)
    if matrices is None:
        return None
    ids = sorted(special_token_ids(tokenizer) if token_ids is None else token_ids)
    ids = [i for i in ids if i < matrices[0].shape[0]]
    return check_matrices(matrices[0], matrices[1], ids, tokenizer)


def flagged_in_model_files(model_dir: Path, tokenizer) -> set[int] | None:
    """Special/added token ids whose rows look untrained in the model dir (for `preview`'s `flagged`); None when
    the embeddings cannot be read without loading the model."""
    rows = check_model_files(model_dir, tokenizer)
    return None if rows is None else {r.token_id for r in rows if r.flagged}
