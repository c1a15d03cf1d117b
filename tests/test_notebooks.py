"""Every example notebook runs top to bottom in a real Jupyter kernel (nbclient), in a fast mode: its `parameters`
cell gets a tiny random model (real tokenizer) and 2 steps appended, papermill style; any cell error fails the test.

The kernel is the `python3` kernelspec, which jupyter_client starts with this interpreter (sys.executable), in the
repository root, so the notebook imports this checkout of qwentune and reads data/ and recipes/ from it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from tiny_models import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))

# Recipe keys the fast mode overrides too: fp32, one row a step, no checkpointing, no sample generation at the end.
FAST_OVERRIDES = {
    "training.precision": "fp32",
    "training.per_device_batch_size": 1,
    "training.grad_accum": 1,
    "training.gradient_checkpointing": False,
    "output.sample_tokens": 0,
}


def fast_parameters(source: str, model_dir: Path, output: Path) -> str:
    """The parameters cell's source with fast values appended for each name it defines (MODEL and OUTPUT required)."""
    fast = {
        "MODEL": str(model_dir),
        "MAX_STEPS": 2,
        "LIMIT": 4,
        "EVAL_LIMIT": 2,
        "N_ROWS": 8,
        "MAX_NEW_TOKENS": 8,
        "OUTPUT": str(output),
        "OVERRIDES": FAST_OVERRIDES,
    }
    defined = set(re.findall(r"^([A-Z_]+)\s*=", source, re.M))
    assert {"MODEL", "MAX_STEPS", "OUTPUT", "OVERRIDES"} <= defined, f"parameters cell defines only {sorted(defined)}"
    lines = [f"{name} = {value!r}" for name, value in fast.items() if name in defined]
    injected = "# Fast mode, injected by tests/test_notebooks.py: a tiny random model, 2 steps"
    return "\n".join([source, "", injected, *lines])


def parameters_cell(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged `parameters`"
    return tagged[0]


def test_every_notebook_has_its_parts():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "bring_your_own_data.ipynb", "dpo.ipynb"} <= names
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].cell_type == "markdown" and "pip install" in nb.cells[0].source, path.name
        assert parameters_cell(nb) == 1, f"{path.name}: the parameters cell comes right after the introduction"
    assert "python3" in KernelSpecManager().find_kernel_specs(), "ipykernel is not installed: pip install -e '.[dev]'"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_in_fast_mode(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # start from a clean notebook: nothing from the committed outputs can leak in
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    index = parameters_cell(nb)
    output = tmp_path / "run"
    nb.cells[index].source = fast_parameters(nb.cells[index].source, tiny_model_dir(tmp_path), output)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))

    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable  # the kernel ran this venv's interpreter
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert (output / "merged" / "model.safetensors").is_file()
    printed = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "Traceback" not in printed
