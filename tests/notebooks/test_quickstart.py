"""The quickstart notebook runs top to bottom on CPU (its code cells, in order)."""
import json

import numpy as np

from tests.conftest import REPO_ROOT


def test_quickstart_notebook_runs(world_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("SEARCHER_WORLD_DIR", str(world_model_dir))
    notebook = json.loads((REPO_ROOT / "notebooks" / "quickstart.ipynb").read_text())
    namespace = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    results = namespace["results"]
    assert len(results) == 4
    # The tiny model searches on unseen questions: it writes a well-formed query in 77% of
    # samples (48 sampled at build time), so half the rows here at least got documents.
    assert sum(r.num_retrievals >= 1 for r in results) >= 2
    assert "<|begin_of_documents|>\n(1)Title: " in "".join(namespace["responses"])
    assert "reward" in capsys.readouterr().out
    assert np.isfinite(float(namespace["metrics"]["loss"]))
    assert int(namespace["state"].step) == 1  # one optimizer step was applied
