"""The real LM's table over router seeds (docs/zoo.md): mean ± sd of each method over the runs of
``moerge bench real`` given on the command line (``results.json`` files), and the papers'
orderings tested on the paired differences (moerge.bench.spread's rule: every run agrees and the
mean difference exceeds its sd).

A run that scored only the seeded methods (``--methods base,experts,oracle,phatgoose,glider,twin
--set phatgoose.seed=S …``) takes the other rows from the first run: those methods (Arrow,
retrieval, the static merges) have no seed and are functions of the same experts, so they are
the same in every run; their sd is 0 by construction and the table marks them n = 1.

    python scripts/real_spread.py scripts/results/real_methods-cpu.json \\
        scripts/results/real_methods-cpu-seed1.json scripts/results/real_methods-cpu-seed2.json
"""

from __future__ import annotations

import json
import sys

from moerge.bench.spread import CLAIMS, figures, mean_sd, orderings, orderings_markdown

COLUMNS = ("held-in normalised", "held-out (%)", "routing (%)")


def main(paths: list[str]) -> None:
    results = [json.loads(open(p).read()) for p in paths]
    runs = [figures(r)["zoo"] for r in results]
    fixed = ("base", "oracle", "best single expert")  # no seed either: the experts alone
    seeded = {name for run in runs[1:] for name in run if name not in fixed and not name.startswith("expert:")}
    for run in runs[1:]:
        for name, row in runs[0].items():
            run.setdefault(name, row)
    names = [n for n in runs[0] if not n.startswith("expert:")]
    print(f"| method | {' | '.join(COLUMNS)} | n |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for name in names:
        cells = []
        for col in COLUMNS:
            values = [run[name][col] for run in runs if col in run.get(name, {})]
            if not values:
                cells.append("")
                continue
            m, sd = mean_sd(values)
            cells.append(f"{m:.1f} ± {sd:.1f}" if name in seeded else f"{m:.1f}")
        n = len(runs) if name in seeded else 1
        print(f"| {name} | {' | '.join(cells)} | {n} |")
    print()
    found = orderings([{"zoo": r} for r in runs], [c for c in CLAIMS if c[0] == "zoo"])
    for c in found:  # two rows without a seed are one build repeated: no spread to test against
        if c["a"] not in seeded and c["b"] not in seeded:
            c["verdict"], c["n"] = "no seed in either row (one build): not tested", 1
    print(orderings_markdown(found))


if __name__ == "__main__":
    main(sys.argv[1:])
