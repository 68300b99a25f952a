"""Server time of Inspect's work on one check image of the built-in zoo: the compute-path
diagram (inspect_image + the diagram + the detail figures, to JSON) and "Compare systems"
(every trained system, as the app's cached live systems run it). Medians after warm-up.

    python scripts/time_inspect.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dynviz import compare, data, live, workspace
from dynviz.policy import Policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--system", default="lcnet_resnet56_seq")
    args = parser.parse_args()
    ws = workspace.builtin()
    check = ws.split("check")
    image = np.asarray(data.load_images(check.dataset)[check.indices[0]])   # one, not all
    system = live.build(ws, args.system)
    spent = []
    for i in range(3 + args.repeats):
        started = time.perf_counter()
        result = live.inspect_image(system, image)
        live.path_diagram(system, result).to_json()
        if result.path is not None:
            [figure.to_json() for figure in result.path.figures().values()]
        if i >= 3:
            spent.append(time.perf_counter() - started)
    print(f"Inspect with the diagram, {args.system}: median "
          f"{statistics.median(spent) * 1e3:.1f} ms of {args.repeats}")

    built: dict = {}

    def live_for(name: str, policy_json):
        if (name, policy_json) not in built:
            policy = None if policy_json is None else Policy.from_json(policy_json)
            built[name, policy_json] = live.build(ws, name, policy)
        return built[name, policy_json]

    label = int(check.labels[0])
    compare.compare(ws, image, label, live_for)                  # builds every system once
    spent = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        compare.compare(ws, image, label, live_for)
        spent.append(time.perf_counter() - started)
    print(f"Compare systems ({len(built)} systems): median "
          f"{statistics.median(spent) * 1e3:.1f} ms of {args.repeats}")


if __name__ == "__main__":
    main()
