"""The published claims of the seeds (``../shared/seeds``), one :func:`register_replication` call
each. The paper's numbers are quotations (the source says where from); ours come from the runs."""

from __future__ import annotations

from perturb_lens.analysis.verdicts import BAND, MIN_SEQS, Claim
from perturb_lens.replication import evaluators as ev
from perturb_lens.replication.inference import ALPHA, CI_WORD
from perturb_lens.replication.registry import register_replication

LEE = "seed 002_1ae696a3b7dae122.txt (Lee & Heimersheim 2024, LessWrong post)"
GIGLEMIANI = "seed 001_3350060bcd2f68c0.txt (abstract); the numbers as quoted in issue 17"
GURNEE_RANGE = (2.2, 4.5)

_ORDER_RULE = (
    f"Paired {CI_WORD} bootstrap CI of the ratio of mean KL a / b at each length (sequences "
    f"resampled; fewer than {MIN_SEQS} paired sequences decide nothing; lengths at the alpha = 0 "
    "noise floor skipped), `perturb-lens verdicts`. Replicated: {holds}; not replicated: "
    "{reversed} at some length (also when it holds at others); inconclusive: no length "
    "decided, or the cov-random statistics were fitted on fewer than 10 x d_model samples."
)
_GREATER = _ORDER_RULE.format(
    holds="the CI lies above 1 at some length and below it at none", reversed="below 1"
)
_CLOSE = _ORDER_RULE.format(
    holds=f"the CI lies within [{BAND[0]}, {BAND[1]}] at some length and outside it at none",
    reversed=f"entirely outside [{BAND[0]}, {BAND[1]}]",
)

_LEE_CLAIMS = (
    (
        "difference",
        "real-difference > real-mixture",
        'KL for "real difference" is greater than KL for "real mixture" (fig. 1, GPT-2 layer 6)',
    ),
    (
        "cov-difference",
        "cov-random-difference > cov-random-mixture",
        'KL for "cov-random difference" is greater than KL for "cov-random mixture" (fig. 1)',
    ),
    (
        "cov-isotropic",
        "cov-random-mixture > isotropic",
        '"Cov-random mixture" induces a significantly greater change in model output than '
        "isotropic random (fig. 2)",
    ),
    (
        "real-cov",
        "real-mixture ~ cov-random-mixture",
        'there is minimal difference between "real mixture" and "cov-random mixture" (fig. 2)',
    ),
)
for _key, _text, _quote in _LEE_CLAIMS:
    for _data, _run in (
        ("lee", "sensitive_directions_lee"),
        ("webtext", "sensitive_directions_webtext"),
    ):
        register_replication(
            f"lee-{_key}-{_data}",
            paper="Lee & Heimersheim 2024",
            claim=f"{_text} (mean KL; data: {_data})",
            paper_number=_quote,
            source=LEE,
            runs=(_run,),
            evaluate=ev.ordering(_text),
            rule=_CLOSE if "~" in _text else _GREATER,
        )

register_replication(
    "gurnee-sae-error",
    paper="Gurnee 2024",
    claim="SAE(x) > isotropic: substituting SAE(x) changes the output more than an isotropic "
    "point at the same distance ||SAE(x) - x||",
    paper_number=f"KL(SAE(x)) is {GURNEE_RANGE[0]}-{GURNEE_RANGE[1]}x KL(isotropic)",
    source='Gurnee 2024 as cited in seed 002 ("confirmed the original finding", fig. 3); '
    "the range as quoted in issue 17",
    runs=("sae_substitution_smollm2",),
    evaluate=ev.sae_substitution("SAE(x) > isotropic", GURNEE_RANGE),
    rule=f"Per SAE the paired {CI_WORD} bootstrap CI of KL(SAE(x)) / KL(isotropic "
    "epsilon-baseline) (sequences resampled). Replicated: above 1 for every SAE; not replicated: "
    "below 1 for some SAE; else inconclusive. How many ratios fall in the paper's range is "
    "reported, not judged.",
)

_PER_SAE_RULE = (
    f"Per SAE the paired {CI_WORD} bootstrap CI of the ratio of mean KL {{a}} / {{b}} (sequences "
    "resampled). Replicated: {holds} for every SAE; not replicated: {reversed} for some SAE; "
    "else inconclusive."
)
register_replication(
    "gurnee-sae-error-layers",
    paper="Gurnee 2024",
    claim="SAE(x) > isotropic at every layer tested (resid_pre of layers 3, 9, 15, 21 and 27 of "
    "30; a TopK k = 64 SAE per layer)",
    paper_number='"The isotropic random substitutions have a much smaller average KL divergence '
    'than other substitution types" (Lee & Heimersheim fig. 3, GPT-2 small, every layer)',
    source=LEE,
    runs=("sae_substitution_smollm2_layers",),
    evaluate=ev.sae_substitution("SAE(x) > isotropic"),
    rule=_PER_SAE_RULE.format(
        a="SAE(x)", b="isotropic epsilon-baseline", holds="above 1", reversed="below 1"
    ),
)
register_replication(
    "lee-real-cov-layers",
    paper="Lee & Heimersheim 2024",
    claim="real-mixture > cov-random-mixture at the SAE-error distance, at every layer tested "
    "(layers 3, 9, 15, 21, 27)",
    paper_number='"Across all the layers, the KL of cov-random mixture are slightly smaller than '
    'the KL of real mixture directions" (fig. 3, GPT-2 small)',
    source=LEE,
    runs=("sae_substitution_smollm2_layers",),
    evaluate=ev.sae_substitution(Claim("real-mixture", ">", "cov-random-mixture")),
    rule=_PER_SAE_RULE.format(
        a="real-mixture", b="cov-random-mixture", holds="above 1", reversed="below 1"
    ),
)
register_replication(
    "lee-sae-cov",
    paper="Lee & Heimersheim 2024",
    claim="SAE(x) ~ cov-random-mixture: at the middle layer, substituting SAE(x) changes the "
    "output about as much as a cov-random-mixture point at the same distance, for every SAE",
    paper_number='"For Layer 6, the SAE models across L0 generally seem to have nearly the same KL '
    'as that of cov-random mixture" (fig. 4, GPT-2 small)',
    source=LEE,
    runs=("sae_substitution_smollm2",),
    evaluate=ev.sae_substitution(
        Claim("SAE(x)", "~", "cov-random-mixture", scale_a="raw", scale_b="sae-error")
    ),
    rule=_PER_SAE_RULE.format(
        a="SAE(x)",
        b="cov-random-mixture epsilon-baseline",
        holds=f"within [{BAND[0]}, {BAND[1]}]",
        reversed=f"entirely outside [{BAND[0]}, {BAND[1]}]",
    ),
)
_EXTRAPOLATION_RULE = (
    f"Per SAE, `perturb-lens verdicts` on its run: the paired {CI_WORD} bootstrap CI of the ratio "
    "of mean KL {a} / isotropic at each length (sequences resampled; the alpha = 0 noise floor "
    "skipped). Replicated: for every SAE the CI lies above 1 at some length and below it at none; "
    "not replicated: below 1 at some length for some SAE; else inconclusive."
)
_EXTRAPOLATION_CLAIMS = (
    (
        "lee-error-extrapolation",
        "Lee & Heimersheim 2024",
        "sae-error",
        "along the unit SAE-error direction the output changes more than along an isotropic "
        "direction of the same length (lengths 1, 11, ..., 201), for every SAE",
        "figs. 5-6 plot SAE-error directions against cov-random-mixture and isotropic ones per "
        "SAE type and L0; the seed's text states no number or observation for them (the claim is "
        "Gurnee's SAE(x) > isotropic along the length axis)",
        "sae_error_extrapolation_smollm2",
    ),
    (
        "lindsey-feature",
        "Lindsey 2024",
        "sae-feature",
        "along an SAE feature direction (alive, inactive in the token's sequence) the output "
        "changes more than along an isotropic direction of the same length (lengths 1-201), for "
        "every SAE",
        '"Perturbations along the SAE feature directions appear to alter the model output more '
        'significantly than random directions" (as cited in seed 002; figs. 7-8)',
        "sae_feature_extrapolation_smollm2",
    ),
)
for _id, _paper, _direction, _text, _quote, _run in _EXTRAPOLATION_CLAIMS:
    register_replication(
        _id,
        paper=_paper,
        claim=_text,
        paper_number=_quote,
        source=LEE,
        runs=(_run,),
        evaluate=ev.sae_suite_ordering(Claim(_direction, ">", "isotropic")),
        rule=_EXTRAPOLATION_RULE.format(a=_direction),
    )
register_replication(
    "lee-feature-local",
    paper="Lee & Heimersheim 2024",
    claim="at lengths 20, 40 and 61, an inactive SAE feature direction changes the output more "
    "for a local SAE than for the e2e / e2e+ds SAE of matched L0",
    paper_number='"The features for local SAE generally induced the greatest change in the SAE '
    'models" (fig. 8: local L0 30.9, e2e 27.5, e2e+ds 31.4, GPT-2 layer 6)',
    source=LEE,
    runs=("sae_feature_extrapolation_smollm2",),
    evaluate=ev.e2e_vs_local_paired("sae-feature", (20.0, 40.0, 61.0), distinct_decoders=True),
    rule=f"Each e2e / e2e+ds SAE of the feature-extrapolation suite is paired with the local "
    f"(ReLU+L1 or TopK) SAE of the nearest L0 if they differ by at most {ev.L0_MATCH:.0%}; per "
    f"pair and length (20, 40, 61) the paired {CI_WORD} bootstrap CI of mean KL(feature, e2e) / "
    "mean KL(feature, local) over the same tokens (sequences resampled; each SAE draws its own "
    "random inactive latent per token). Replicated: every CI below 1; not replicated: some CI "
    f"above 1; else inconclusive (also under {MIN_SEQS} sequences, and for a pair whose decoder "
    f"rows agree, median cosine above {ev.SAME_DECODER}: their features are the same).",
)

register_replication(
    "braun-e2e",
    paper="Braun et al. 2024",
    claim="at matched L0, e2e SAEs' SAE(x) changes the output less (held-out KL) than local SAEs'",
    paper_number='e2e SAEs "find points that are further away, but have much lower KL" (seed 002, '
    "supp. fig. 3); authors' notebooks (SPEC.md section 6, GPT-2 layer 6): local L0 42.8 KL 0.230, "
    "e2e L0 39.7 KL 0.122",
    source="seed 002_1ae696a3b7dae122.txt; docs/SPEC.md section 6",
    runs=("sae_train_smollm2_layer15_topk_e2e",),
    evaluate=ev.e2e_vs_local,
    rule=f"Each e2e / e2e+ds SAE is paired with the local (ReLU+L1 or TopK) SAE of the nearest "
    f"L0 if the two differ by at most {ev.L0_MATCH:.0%}; one-sided sign test over the pairs "
    f"(eval.json holds means only, so the pair is the unit). Replicated: p < {ALPHA} for e2e "
    f"lower; not replicated: p < {ALPHA} for local lower; else inconclusive (5 pairs at least "
    "are needed to decide).",
)

register_replication(
    "braun-e2e-paired",
    paper="Braun et al. 2024",
    claim="at matched L0, substituting an e2e SAE's SAE(x) changes the output less (mean KL, "
    "same held-out tokens) than a local SAE's",
    paper_number="as braun-e2e (local L0 42.8 KL 0.230 vs e2e L0 39.7 KL 0.122, GPT-2 layer 6)",
    source="seed 002_1ae696a3b7dae122.txt; docs/SPEC.md section 6",
    runs=("sae_substitution_smollm2",),
    evaluate=ev.e2e_vs_local_paired(),
    rule=f"Each e2e / e2e+ds SAE of the SAE-substitution suite is paired with the local (ReLU+L1 "
    f"or TopK) SAE of the nearest L0 if they differ by at most {ev.L0_MATCH:.0%} (TopK pairs at "
    f"equal k: identical L0); paired {CI_WORD} bootstrap CI of mean KL(SAE_e2e(x)) / mean "
    "KL(SAE_local(x)) over the same tokens (sequences resampled). Replicated: every CI below 1; "
    f"not replicated: some CI above 1; else inconclusive (also under {MIN_SEQS} sequences).",
)

register_replication(
    "giglemiani-max-slope",
    paper="Giglemiani et al. 2024",
    claim="interpolating towards a real activation, the output changes fastest earlier than "
    "towards a cov-random one (step of maximal slope)",
    paper_number="max-slope step real 51.65 +- 7.42 vs cov-random 64.89 +- 10.5, KS 0.62 "
    "(GPT-2, 101 steps)",
    source=GIGLEMIANI,
    runs=("synthetic_activations",),
    evaluate=ev.max_slope_real_vs_random,
    rule=f"{CI_WORD} bootstrap CI of the mean paired difference cov-random - real of the "
    "max-slope step (prompts resampled). Replicated: above 0; not replicated: below 0; else "
    f"inconclusive (also under {MIN_SEQS} prompts). The KS distance and its p-value are shown.",
)

register_replication(
    "giglemiani-synthetic-ks",
    paper="Giglemiani et al. 2024",
    claim="synthetic activations (SAE latents) resemble real ones: their max-slope steps are "
    "closer to the real ones' than the cov-random ones' are",
    paper_number="KS to real: synthetic 0.19-0.27 vs cov-random 0.62",
    source=GIGLEMIANI,
    runs=("synthetic_activations",),
    evaluate=ev.synthetic_like_real,
    rule=f"Per synthetic target the {CI_WORD} bootstrap CI of KS(cov-random, real) - "
    "KS(synthetic, real) (prompts resampled, the same draws for both). Replicated: above 0 for "
    "every synthetic target; not replicated: below 0 for some; else inconclusive.",
)

_PLATEAU_RULE = (
    f"{CI_WORD} bootstrap CI of the mean paired difference real - {{base}} of the plateau length "
    "(first step above 10% of the end value, averaged over the random directions of a prompt; "
    "prompts resampled). Replicated: above 0; not replicated: below 0; else inconclusive."
)
_PLATEAU_CLAIMS = (
    (
        "heimersheim-plateaus",
        "Heimersheim 2024",
        "cov-random",
        "activation plateaus: random perturbations leave the output flat for longer around real "
        "activations than around cov-random points",
        '"a step-function-like change"; sensitivity "differs between model-generated (real) '
        'activations and random activations" (no number in the seeds)',
        "seed 001_3350060bcd2f68c0.txt (abstract, citing Heimersheim's report)",
    ),
    (
        "giglemiani-synthetic-plateaus",
        "Giglemiani et al. 2024",
        "synthetic",
        "synthetic activations have less pronounced plateaus than real ones",
        '"synthetic activations exhibit less pronounced activation plateaus compared to those '
        'typically surrounding real activations" (no number in the seeds)',
        "seed 001_3350060bcd2f68c0.txt (abstract)",
    ),
)
for _id, _paper, _base, _text, _quote, _source in _PLATEAU_CLAIMS:
    register_replication(
        _id,
        paper=_paper,
        claim=_text,
        paper_number=_quote,
        source=_source,
        runs=("plateaus",),
        evaluate=ev.plateau_longer(_base),
        rule=_PLATEAU_RULE.format(base=_base),
    )

register_replication(
    "janiak-stable-regions",
    paper="Janiak et al. 2024",
    claim="stable regions: between two prompts' activations the output stays put, then changes "
    "sharply at a region boundary",
    paper_number="\"the model's output remains insensitive to small activation changes, but "
    'exhibits high sensitivity at region boundaries" (no number in the seeds)',
    source="seed 004_ef95c0f89065752a.txt",
    runs=("stable_regions",),
    evaluate=ev.sharp_transitions,
    rule=f"Sharpness: the largest step-to-step increase of the output change over its end value "
    f"(a straight line gives 1 / (L - 1) on an L-point grid). {CI_WORD} bootstrap CI of the "
    f"median sharpness (prompt pairs resampled). Replicated: above {ev.STEEP:g} / (L - 1); not "
    "replicated: below it; else inconclusive.",
)
