"""The README's library example runs as written from outside the repository (dynviz is
installed), and says what the library computes."""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from dynviz import learn, policy, settings, zoo
from tests.helpers import INSTALL_HINT, run_outside

README = settings.PROJECT_ROOT / "README.md"


def library_example() -> str:
    section = README.read_text().split("## The library in ten lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_library_example_is_about_ten_lines():
    code = [line for line in library_example().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 12


def test_the_library_imports_from_outside_the_repository(tmp_path):
    run = run_outside([sys.executable, "-c",
                       "import dynviz, models; print(dynviz.__file__); print(models.__file__)"],
                      tmp_path)
    assert run.returncode == 0, f"{run.stderr}\n{INSTALL_HINT}"
    homes = [Path(file).resolve().parents[1] for file in run.stdout.splitlines()]
    assert homes == [settings.PROJECT_ROOT] * 2, f"{INSTALL_HINT}; imported from {homes}"


@pytest.mark.slow
def test_the_library_example_runs_and_prints_what_the_library_computes(real_cifar, ws,
                                                                       tmp_path):
    run = run_outside([sys.executable, "-c", library_example()], tmp_path)
    assert run.returncode == 0, f"{run.stderr}\n{INSTALL_HINT}"
    first, second = run.stdout.strip().splitlines()[-2:]
    prediction, share, path = first.split(" ", 2)
    assert prediction in ws.data.classes and 0 < float(share) <= 1
    assert set(ast.literal_eval(path)) == {"blocks_executed", "blocks"}
    # reference: the budget's policy re-learned here and judged on the check half
    cached = zoo.outputs(ws, "cascade_r8_r20_r56", ws.split("val"), progress=False)
    fit, check = cached.half("fit"), cached.half("check")
    rule = learn.target_budget(fit, 0.4, topology="jump")
    expected = policy.simulate(rule, check).summary(check.reference_cost, check.n_stages)
    shown = ast.literal_eval(second)
    assert shown["exit_histogram"] == expected["exit_histogram"]
    assert np.isclose(shown["accuracy"], expected["accuracy"])
    assert shown["cost_fraction"] <= 0.4 + 0.02      # within its budget, judged on fit
    json.dumps(shown)                                 # plain data, nothing else
