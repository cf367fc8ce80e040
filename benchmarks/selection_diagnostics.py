"""Why a selection strategy picks what it picks, on the demo's worlds (the evidence behind docs/SELECTION.md).

    python benchmarks/selection_diagnostics.py --seeds 0 1 2      # uses (or fills) the demo's model cache

For each seed: the demo's trained tiny LLaVA (``manu_fast.demo.load_or_train``), profiled like the demo's
fixed-alpha rows (profiling questions, every position). Printed, for the language model's neurons:

1. manu-paper's four terms: their medians on forget and retain data, each term's share of I(forget) (its sum
   over the neurons over the sum of I(forget)), and the rank correlation (Spearman) of the final score S with
   the forget/retain ratio of each term alone;
2. split-half reliability: each strategy's scores from profiling phrasing 0 alone vs phrasing 1 alone (Spearman):
   a score that measures a property of the neurons gives the same ranking on both halves, a noise score does not;
3. forget specificity: per neuron and modality, log2 of forget/retain mean a^2 (0 = as active on forget as on
   retain data); its mean over the top 30 % each strategy picks and over all neurons, and its rank correlation
   with each strategy's score. A strategy that finds the forget set's neurons picks positive ones.
"""
from __future__ import annotations

import argparse
import math

import torch

from manu_fast import demo
from manu_fast.synthetic import MODALITIES, PROFILE_TEMPLATES, PROFILE_VARIANT, num_image_tokens
from manu_fast.profiler import profile
from manu_fast.select import EPS, cross_modal_terms, natural_key, scores

STRATEGIES = ("manu-code", "manu-paper", "power-ratio")
TERMS = ("abs", "freq", "var", "rms")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def profile_people(model, data, people: dict, templates) -> "NeuronStats":  # noqa: F821
    """Profile ``people`` ({split: person indices}) on the given profiling phrasings, every position."""
    tokens = num_image_tokens(model.config)
    batches = {(split, m): [b.inputs for b in data.batches(data.questions(who, templates), m, tokens, 128,
                                                             variant=PROFILE_VARIANT, profile="all")]
               for split, who in people.items() for m in MODALITIES}
    return profile(model, batches, progress=False)


def language_layers(stats) -> list[str]:
    return sorted((n for n in stats.layers() if stats.fingerprint["layers"][n].get("tower") == "language"),
                  key=natural_key)


def lm_scores(stats, strategy: str) -> torch.Tensor:
    sc = scores(stats, strategy, towers=["language"])
    return torch.cat([sc[n] for n in language_layers(stats)])


def paper_terms(stats) -> dict:
    """manu-paper's terms per split on the language model (manu_fast.select.cross_modal_terms)."""
    out = {}
    for split in ("forget", "retain"):
        parts = [cross_modal_terms(*(stats.pooled(n, "hidden", stats.group_ids(split, mod)) for mod in MODALITIES))
                 for n in language_layers(stats)]
        out[split] = {t: torch.cat([p[t] for p in parts]) for t in TERMS}
    return out


def specificity(stats) -> torch.Tensor:
    """(2, N): log2 of forget/retain mean a^2 per modality (multimodal, text) of every language-model neuron."""
    rows = []
    for mod in MODALITIES:
        ratio = [stats.pooled(n, "hidden", stats.group_ids("forget", mod))["rms"] ** 2
                 / (stats.pooled(n, "hidden", stats.group_ids("retain", mod))["rms"] ** 2 + EPS)
                 for n in language_layers(stats)]
        rows.append(torch.log2(torch.cat(ratio) + EPS))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cache-dir", default=None, help="the demo's model cache (default: as `manu-fast demo`)")
    args = parser.parse_args()
    demo.exec_with_numeric_env()  # the demo's numerics: the same models as `manu-fast demo` trains and caches
    with demo.fixed_numerics():
        for seed in args.seeds:
            cfg = demo.ModelConfig(seed=seed)
            model, data, _ = demo.load_or_train(cfg, args.cache_dir, progress=False)
            forget, retain = data.split(demo.ExperimentConfig().forget_percent)
            people = {"forget": forget, "retain": retain}
            stats = profile_people(model, data, people, PROFILE_TEMPLATES)
            print(f"\n== seed {seed}: {len(forget)} forget people, {len(retain)} retain people, "
                  f"{sum(stats.block(n).shape[-1] for n in language_layers(stats))} language-model neurons")
            terms = paper_terms(stats)
            total = {s: sum(terms[s].values()) for s in terms}
            s_paper = total["forget"] / (total["retain"] + EPS)
            print("manu-paper terms (language model): median forget | retain, share of I(forget), "
                  "Spearman(S, forget/retain ratio of the term)")
            for t in TERMS:
                f, r = terms["forget"][t], terms["retain"][t]
                print(f"  I_{t:<4} {f.median():6.3f} | {r.median():6.3f}   share {float(f.sum() / total['forget'].sum()):4.2f}"
                      f"   Spearman {spearman(s_paper, f / (r + EPS)):5.2f}")
            print(f"  S = I(forget)/I(retain): median {s_paper.median():.3f}, 1-99 % {s_paper.quantile(0.01):.3f}"
                  f"-{s_paper.quantile(0.99):.3f}")
            halves = [profile_people(model, data, people, (t,)) for t in PROFILE_TEMPLATES]
            spec = specificity(stats)
            for strategy in STRATEGIES:
                real = lm_scores(stats, strategy)
                top = real.argsort(descending=True, stable=True)[:math.floor(0.3 * real.numel() + 0.5)]
                print(f"{strategy:<12} split-half Spearman {spearman(*(lm_scores(h, strategy) for h in halves)):5.2f}; "
                      "specificity (mm/txt): mean of its top 30 % " + "/".join(f"{v:+.2f}" for v in spec[:, top].mean(1))
                      + ", Spearman with its score " + "/".join(f"{spearman(real, row):+.2f}" for row in spec))
            print(f"{'all neurons':<12} specificity (mm/txt): mean " + "/".join(f"{v:+.2f}" for v in spec.mean(1)))


if __name__ == "__main__":
    main()
