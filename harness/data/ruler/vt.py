"""Variable tracking, after NVIDIA/RULER ``scripts/data/synthetic/variable_tracking.py``.

* :func:`chains` = ``generate_chains`` (l.93-114): ``(num_hops + 1) * num_chains`` distinct
  upper-case names of 5 letters (3 for the in-context example), ``VAR X = <5-digit value>``
  (``np.random.randint(10000, 99999)``; here ``rng.randrange(10000, 99999)``, the same range)
  followed by ``VAR Y = VAR X `` hops (trailing space as in RULER).
* :func:`build` = ``generate_input_output`` for the noise haystack (l.130-177): for each chain,
  ``sorted(random.sample(range(len(sentences)), len(chain)))`` positions; element ``j`` is
  inserted at ``position + j``; lines joined by ``"\\n"``; ``". \\n"`` -> ``".\\n"``. The answer is
  the first chain's variables; the query is its value; ``num_v = num_hops + 1``.
* In-context example (``main`` l.299-315 and ``sys_vartrack_w_noise_random`` l.191-243): one
  example with 3-letter names and value 12345, sized to <= 500 tokens with no generation budget
  and formatted with the bare task template + answer prefix, followed by its answer
  (``input + " " + " ".join(outputs) + "\\n"``, l.217-218). For each sample, :func:`randomize_icl`
  (l.179-189) renames the example's answer variables and replaces 12345 by a fresh 5-digit
  value, and the result + ``"\\n"`` is put before the prompt (l.262-265; with RULER's 'base'
  model template the cut-off is position 0).

Only the "noise" haystack is implemented (the configuration RULER's synthetic.yaml uses for vt).
"""

from __future__ import annotations

import string
from random import Random

from harness.data.ruler import templates


def chains(rng: Random, num_chains: int, num_hops: int, is_icl: bool = False):
    k = 3 if is_icl else 5
    num_hops = min(10, num_hops) if is_icl else num_hops
    vars_all = ["".join(rng.choices(string.ascii_uppercase, k=k)).upper() for _ in range((num_hops + 1) * num_chains)]
    while len(set(vars_all)) < num_chains * (num_hops + 1):
        vars_all.append("".join(rng.choices(string.ascii_uppercase, k=k)).upper())
    vars_ret, chains_ret = [], []
    for i in range(0, len(vars_all), num_hops + 1):
        this_vars = vars_all[i : i + num_hops + 1]
        vars_ret.append(this_vars)
        if is_icl:
            this_chain = [f"VAR {this_vars[0]} = 12345"]
        else:
            this_chain = [f"VAR {this_vars[0]} = {rng.randrange(10000, 99999)}"]
        for j in range(num_hops):
            this_chain.append(f"VAR {this_vars[j + 1]} = VAR {this_vars[j]} ")
        chains_ret.append(this_chain)
    return vars_ret, chains_ret


def min_size(args: dict) -> int:
    return args["num_hops"] + 1  # random.sample(range(len(sentences)), len(chain))


def build(args: dict, num_noises: int, rng: Random, is_icl: bool = False):
    """Prompt (without the in-context example), answer variables, metadata."""
    num_chains, num_hops = args["num_chains"], args["num_hops"]
    vars_, chains_ = chains(rng, num_chains, num_hops, is_icl=is_icl)
    value = chains_[0][0].split("=")[-1].strip()
    sentences = [templates.NOISE] * num_noises
    line_positions: list[int] = []
    for c, chain in enumerate(chains_):
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for insert_pi, j in zip(positions, range(len(chain)), strict=True):
            sentences.insert(insert_pi + j, chain[j])
        if c == 0:
            line_positions = positions
    context = "\n".join(sentences).replace(". \n", ".\n")
    prompt = templates.full_template("variable_tracking").format(context=context, query=value, num_v=num_hops + 1)
    meta = {
        "depths": [100.0 * p / num_noises for p in line_positions],
        "depth": 100.0 * line_positions[0] / num_noises,
        "value": value,
        "num_haystack": num_noises,
    }
    return prompt, vars_[0], meta


def icl_text(prompt: str, outputs: list[str]) -> str:
    """The in-context example as RULER appends it (l.217-218)."""
    return prompt + " " + " ".join(outputs) + "\n"


def randomize_icl(icl_example: str, num_hops: int, rng: Random) -> str:
    """variable_tracking.py l.179-189, verbatim apart from the RNG."""
    icl_tgt = icl_example.strip().split()[-num_hops - 1 :]
    for item in icl_tgt:
        new_item = "".join(rng.choices(string.ascii_uppercase, k=len(item))).upper()
        icl_example = icl_example.replace(item, new_item)
    old_value = "12345"
    new_value = str(rng.randrange(10000, 99999))
    return icl_example.replace(old_value, new_value)
