"""Subject matching: SubjectIndex against a brute-force scan of every pattern.

Builds an index of many subscriptions with mixed wildcards and measures lookups per second
with the cache cold (every subject new) and warm (a few hot subjects repeated). Two
brute-force baselines run in the same process on the same patterns: one calls the public
``matches`` for every pattern (validating both sides each time, as a naive caller would),
the other compares pre-split tokens only, the cheapest a linear scan can be. Every
subject measured against the baselines is also checked to get the same answer from the
index.

    python benchmarks/subjects.py [--json] [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from pigeon.subjects import SubjectIndex, matches

SUBSCRIPTIONS = 10_000
# Tokens available at each depth: few roots, widening below, as real subject trees are.
VOCABULARY = [10, 50, 100, 200, 200]
STAR_CHANCE = 0.15
GT_CHANCE = 0.10
ROOT_STAR_CHANCE = 0.02


def make_patterns(rng: random.Random, count: int) -> list[str]:
    out = []
    for _ in range(count):
        depth = rng.randint(2, len(VOCABULARY))
        tokens = [f"t{level}_{rng.randrange(VOCABULARY[level])}" for level in range(depth)]
        if rng.random() < ROOT_STAR_CHANCE:
            tokens[0] = "*"
        for i in range(1, depth):
            if rng.random() < STAR_CHANCE:
                tokens[i] = "*"
        if rng.random() < GT_CHANCE:
            tokens[-1] = ">"
        out.append(".".join(tokens))
    return out


def make_subjects(rng: random.Random, patterns: Sequence[str], count: int) -> list[str]:
    """Unique subjects: half derived from a pattern (so something matches), half random."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        if rng.random() < 0.5:
            tokens = []
            for level, token in enumerate(rng.choice(patterns).split(".")):
                if token == "*":
                    token = f"t{level}_{rng.randrange(VOCABULARY[level])}"
                elif token == ">":
                    extra = rng.randint(1, len(VOCABULARY) - level)
                    token = ".".join(
                        f"t{d}_{rng.randrange(VOCABULARY[d])}" for d in range(level, level + extra)
                    )
                tokens.append(token)
            subject = ".".join(tokens)
        else:
            depth = rng.randint(2, len(VOCABULARY))
            subject = ".".join(f"t{d}_{rng.randrange(VOCABULARY[d])}" for d in range(depth))
        if subject not in seen:
            seen.add(subject)
            out.append(subject)
    return out


def timed(run: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    results = run()
    return time.perf_counter() - start, results


def rate(lookups: int, seconds: float) -> dict[str, Any]:
    return {
        "lookups": lookups,
        "seconds": round(seconds, 4),
        "matches_per_s": round(lookups / seconds, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a short run (a few seconds)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    cold_lookups, warm_lookups, hot_subjects, brute_lookups = (
        (5_000, 200_000, 100, 25) if args.quick else (50_000, 2_000_000, 100, 250)
    )
    rng = random.Random(args.seed)
    patterns = make_patterns(rng, SUBSCRIPTIONS)
    subjects = make_subjects(rng, patterns, cold_lookups + brute_lookups)
    cold_subjects, brute_subjects = subjects[:cold_lookups], subjects[cold_lookups:]

    index: SubjectIndex[int] = SubjectIndex()

    def build() -> int:
        for value, pattern in enumerate(patterns):
            index.add(pattern, value)
        return len(index)

    build_seconds, _ = timed(build)

    def run_index(batch: Sequence[str]) -> int:
        found = 0
        for subject in batch:
            found += len(index.match(subject))
        return found

    # Cold: every subject is new, so each lookup walks the trie (and fills the cache).
    cold_seconds, cold_found = timed(lambda: run_index(cold_subjects))

    hot = cold_subjects[:hot_subjects]
    warm_batch = [hot[i % len(hot)] for i in range(warm_lookups)]
    run_index(hot)  # prime the cache
    warm_seconds, _ = timed(lambda: run_index(warm_batch))

    def brute_public() -> int:
        found = 0
        for subject in brute_subjects:
            for pattern in patterns:
                if matches(pattern, subject):
                    found += 1
        return found

    split_patterns = [(i, p.split(".")) for i, p in enumerate(patterns)]

    def brute_presplit_answers(subject: str) -> list[int]:
        tokens = subject.split(".")
        hits = []
        for value, ptokens in split_patterns:
            for i, token in enumerate(ptokens):
                if token == ">":
                    ok = len(tokens) > i
                    break
                if i >= len(tokens) or (token != "*" and token != tokens[i]):
                    ok = False
                    break
            else:
                ok = len(ptokens) == len(tokens)
            if ok:
                hits.append(value)
        return hits

    brute_seconds, brute_found = timed(brute_public)
    presplit_seconds, _ = timed(lambda: sum(len(brute_presplit_answers(s)) for s in brute_subjects))

    agree = all(
        Counter(index.match(s)) == Counter(brute_presplit_answers(s)) for s in brute_subjects
    )
    agree = agree and brute_found == run_index(brute_subjects)

    cold = rate(cold_lookups, cold_seconds)
    warm = rate(warm_lookups, warm_seconds)
    brute = rate(brute_lookups, brute_seconds)
    presplit = rate(brute_lookups, presplit_seconds)
    report = {
        "benchmark": "subjects",
        "quick": args.quick,
        "seed": args.seed,
        "python": platform.python_version(),
        "subscriptions": SUBSCRIPTIONS,
        "patterns_with_star": sum("*" in p for p in patterns),
        "patterns_with_gt": sum(p.endswith(">") for p in patterns),
        "build_seconds": round(build_seconds, 4),
        "mean_results_per_subject": round(cold_found / cold_lookups, 3),
        "cold": cold,
        "warm": {**warm, "distinct_subjects": len(hot)},
        "brute_force_matches": brute,
        "brute_force_presplit": presplit,
        "speedup": {
            "cold_vs_brute_force_matches": round(cold["matches_per_s"] / brute["matches_per_s"], 1),
            "warm_vs_brute_force_matches": round(warm["matches_per_s"] / brute["matches_per_s"], 1),
            "cold_vs_brute_force_presplit": round(
                cold["matches_per_s"] / presplit["matches_per_s"], 1
            ),
            "warm_vs_brute_force_presplit": round(
                warm["matches_per_s"] / presplit["matches_per_s"], 1
            ),
        },
        "results_agree": agree,
    }

    if args.json:
        print(json.dumps(report))
    else:
        print(f"{SUBSCRIPTIONS} subscriptions, index built in {build_seconds:.3f} s")
        for name in ("cold", "warm", "brute_force_matches", "brute_force_presplit"):
            entry = report[name]
            print(f"  {name:22} {entry['matches_per_s']:>14,.0f} lookups/s")
        for name, ratio in report["speedup"].items():
            print(f"  {name:30} x{ratio}")
        print(f"  results agree with brute force: {agree}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
