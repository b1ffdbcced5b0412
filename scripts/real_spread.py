"""The real LM's table over seeds (docs/zoo.md): mean ± sd of each method over the runs of
``moerge bench real`` given on the command line (``results.json`` files), and the papers'
orderings tested on the paired differences (moerge.bench.spread's rule: every run agrees and the
mean difference exceeds its sd).

The first file is a full run. A later run may score only some methods — the seeded routers
(``--methods base,experts,oracle,phatgoose,glider,twin --set phatgoose.seed=S …``) or Symbolic-MoE
over the whole models (``--methods base,experts,oracle,symbolic_moe,majority_vote,best_single
--set symbolic_moe.seed=S``). A method's figures are those of the runs that scored it: a row in
several runs is mean ± sd over them (n stated); a row in one run only (Arrow, retrieval, the
static merges: no seed, functions of the same experts) is one value, n = 1, and so are the rows
of the experts alone (base, oracle, best single expert or model), whatever runs have them. A
one-value row is put into every run, so an ordering against it pairs each seeded run with the
same value; two one-value rows are not compared.

    python scripts/real_spread.py scripts/results/real_methods-cpu.json \\
        scripts/results/real_methods-cpu-seed{1,2}.json scripts/results/real_symbolic-cpu-seed{0,1,2}.json

With ``--builds`` the files are independent expert builds (``MOERGE_ZOO_SEED=S moerge bench
real``: another split of the entities, other experts): only the rows every build scored are
shown, each varying (the experts' own rows too), nothing is carried from one build to another,
and each expert's score on its own task is given over the builds as well.

    python scripts/real_spread.py --builds \\
        scripts/results/real_methods-cpu.json,scripts/results/real_symbolic-cpu-seed0.json \\
        scripts/results/real_build-cpu-seed1.json,scripts/results/real_symbolic_build-cpu-seed1.json \\
        scripts/results/real_build-cpu-seed2.json,scripts/results/real_symbolic_build-cpu-seed2.json

A ``FILE1,FILE2`` argument is one run that two commands scored (a build's LoRA methods, then its
Symbolic-MoE): their rows together.
"""

from __future__ import annotations

import json
import sys

from moerge.bench.spread import CLAIMS, compare, figures, mean_sd, orderings_markdown

COLUMNS = ("held-in normalised", "held-out (%)", "routing (%)")
#: rows with no seed: the experts alone, the same in every run
FIXED = ("base", "oracle", "best single expert", "best single model")
#: Symbolic-MoE's orderings on this table (the paper: above its best single model and the plain vote)
SYMBOLIC_CLAIMS = tuple(
    ("zoo", col, "Symbolic-MoE", b)
    for col in ("held-in normalised", "held-out (%)")
    for b in ("best single model", "majority vote of the recruited")
) + (("zoo", "held-in normalised", "majority vote of the recruited", "best single model"),)

#: what the builds can test besides the papers' orderings: the routers and merges every build scores
BUILD_CLAIMS = (
    ("zoo", "held-in normalised", "retrieval", "TIES"),
    ("zoo", "held-in normalised", "Arrow", "TIES"),
    ("zoo", "held-in normalised", "TIES", "uniform average"),
)


def main(paths: list[str]) -> None:
    builds = paths[:1] == ["--builds"]
    paths = paths[1:] if builds else paths
    # FILE1,FILE2: one run scored in two commands (a build's LoRA methods, then its Symbolic-MoE)
    groups = [[json.loads(open(f).read()) for f in p.split(",")] for p in paths]
    results = [g[0] for g in groups]
    runs = [{name: row for r in g for name, row in figures(r)["zoo"].items()} for g in groups]
    scored = {name: [i for i, run in enumerate(runs) if name in run] for run in runs for name in run}
    if builds:  # each build's rows are functions of its own experts: only rows every build has, nothing shared
        names = [n for n in scored if not n.startswith("expert:") and len(scored[n]) == len(runs)]
        unseeded: list[str] = []
    else:
        names = [n for n in scored if not n.startswith("expert:")]
        unseeded = [n for n in scored if n in FIXED or len(scored[n]) == 1]
    for name in unseeded:  # one value: pair each seeded run with it
        first = runs[scored[name][0]][name]
        for run in runs:
            run.setdefault(name, first)
    print(f"| method | {' | '.join(COLUMNS)} | n |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for name in names:
        seeded = name not in unseeded
        use = [runs[i] for i in scored[name]] if seeded else [runs[scored[name][0]]]
        cells = []
        for col in COLUMNS:
            values = [run[name][col] for run in use if col in run[name]]
            if not values:
                cells.append("")
                continue
            m, sd = mean_sd(values)
            cells.append(f"{m:.1f} ± {sd:.1f}" if seeded else f"{m:.1f}")
        print(f"| {name} | {' | '.join(cells)} | {len(use)} |")
    print()
    found = []
    for claim in [c for c in CLAIMS if c[0] == "zoo"] + list(SYMBOLIC_CLAIMS) + list(BUILD_CLAIMS if builds else ()):
        _, col, a, b = claim
        if a not in names or b not in names:
            continue
        both = [{"zoo": run} for run in runs if a in run and b in run]
        c = compare(both, *claim) if both else None
        if c is None:
            continue
        if a in unseeded and b in unseeded:
            c["verdict"], c["n"] = "no seed in either row (one build): not tested", 1
        found.append(c)
    print(orderings_markdown(found))
    if builds:  # the +30 target over builds: each expert on its own task, against the base
        print("\n| expert on its own task (exact match, %) | " + " | ".join(f"build {i}" for i in range(len(results)))
              + " | mean ± sd | base |")  # fmt: skip
        print("|---|" + "---:|" * (len(results) + 2))
        for task in results[0]["held_in"]:
            own = [100 * r["cross_task_matrix"][task][task] for r in results]
            base = [100 * r["methods"]["base"]["per_task"][task] for r in results]
            m, sd = mean_sd(own)
            print(f"| `{task}` | {' | '.join(f'{v:.1f}' for v in own)} | {m:.1f} ± {sd:.1f} | {max(base):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
