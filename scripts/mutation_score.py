"""Print the mutation score of the last ``mutmut run`` (``make mutate``) per module, and its survivors.

mutmut 3 keeps each module's results in ``mutants/<path>.meta``: an exit code per mutant (1 or 3: a test
failed, the mutant is killed; 0: every test passed, it survived; 33 or 5: no test runs its code).
A mutant no test reaches counts as a survivor: nothing would notice it. Survivors judged equivalent
(docs/testing.md) are listed in ``--equivalent FILE``, one mutant name a line, and left out of the score.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

KILLED, SURVIVED, NO_TESTS, TIMEOUT = {1, 3}, {0}, {5, 33}, {24, -24, 36}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", default="mutants", help="mutmut's folder (default: mutants)")
    parser.add_argument("--equivalent", help="file of survivors judged equivalent, one mutant name a line")
    parser.add_argument("--survivors", default="build/mutation-survivors.txt",
                        help="where to list the survivors (default: build/mutation-survivors.txt)")
    args = parser.parse_args(argv)
    equivalent = set()
    if args.equivalent and Path(args.equivalent).exists():
        equivalent = {line.split("#")[0].strip() for line in Path(args.equivalent).read_text().splitlines()} - {""}
    totals, survivors = Counter(), []
    print(f"{'module':32} {'killed':>7} {'survived':>9} {'no test':>8} {'equiv.':>7} {'score':>7}")
    for meta in sorted(Path(args.mutants).rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        counts = Counter()
        for name, code in codes.items():
            kind = ("equivalent" if name in equivalent else "killed" if code in KILLED or code in TIMEOUT
                    else "survived" if code in SURVIVED else "no test" if code in NO_TESTS else "not run")
            counts[kind] += 1
            if kind in ("survived", "no test"):
                survivors.append(f"{name}  # {kind}")
        totals.update(counts)
        print(_row(str(meta.relative_to(args.mutants))[:-len(".meta")], counts))
    print(_row("all", totals))
    Path(args.survivors).parent.mkdir(parents=True, exist_ok=True)
    Path(args.survivors).write_text("".join(f"{line}\n" for line in survivors))
    print(f"{len(survivors)} survivors listed in {args.survivors} (see one with: .venv/bin/mutmut show NAME)")
    if totals["not run"]:
        print(f"{totals['not run']} mutants were not run: the run was interrupted")
    return 0


def _row(name: str, counts: Counter) -> str:
    judged = counts["killed"] + counts["survived"] + counts["no test"]
    score = f"{100 * counts['killed'] / judged:.1f}%" if judged else "-"
    return (f"{name:32} {counts['killed']:7} {counts['survived']:9} {counts['no test']:8} {counts['equivalent']:7} "
            f"{score:>7}")


if __name__ == "__main__":
    raise SystemExit(main())
