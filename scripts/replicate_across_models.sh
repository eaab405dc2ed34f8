#!/usr/bin/env bash
# The cross-model replication runs behind REPLICATION.md, at the sizes 2 CPU cores allowed.
#
# Every model is run the same way (SmolLM2 too, so that the columns compare): the claims at the
# model's middle layer (n_layers // 2; `perturb-lens replication --help` lists the layout), one
# TopK k = 64 SAE per model trained there, and the sizes below, which are smaller than the
# presets' published ones (drop the overrides on a bigger machine). Each model's runs go to
# RUNS_ROOT/<model>/<run>, the folders `perturb-lens replication RUNS_ROOT` reads; a finished run
# is skipped and an interrupted one resumed, so the script can be run again until it completes.
#
#   bash scripts/replicate_across_models.sh [STAGE ...]   # stages: stable sens sae plateaus
#                                                         #   synthetic subst extrap webtext atlas
#   perturb-lens replication runs/replication --out REPLICATION.md
#   perturb-lens compare --atlas runs/atlas/* --out docs/figures/atlas   # the layer atlas
set -euo pipefail
cd "$(dirname "$0")/.."
PL=${PL:-.venv/bin/perturb-lens}
ROOT=${RUNS_ROOT:-runs/replication}
MODELS=${MODELS:-"smollm2-135m gemma3-270m qwen2.5-0.5b"}
WEBTEXT=../shared/data/webtext/webtext.test.jsonl
# Sizes (the presets' own in brackets): sensitive directions 24 sequences [96] at 7 of the 12
# relative lengths; synthetic activations 100 prompts [1000]; SAE: all of WebText test in rows of
# 64 tokens (5,109 / 4,815 / 4,768 rows under the three tokenizers), 12 passes, evaluated on 256
# held-out rows [1,024].
SENS_SIZE=(data.n_seqs=24 "lengths=[0.0, 0.01, 0.03, 0.11, 0.2, 0.36, 0.71]")
SAE_SIZE=(eval_data.n_seqs=256 "saes=[{name: topk-k64, kind: topk, k: 64, epochs: 12}]")
declare -A LAYERS=([smollm2-135m]=30 [gemma3-270m]=18 [qwen2.5-0.5b]=24)
declare -A SAE_ROWS=([smollm2-135m]=5109 [gemma3-270m]=4815 [qwen2.5-0.5b]=4768)  # all of WebText test

done_run() { [ -f "$1/manifest.json" ] && grep -q '"complete": *true' "$1/manifest.json"; }

run() {  # run OUT CONFIG [OVERRIDES...]: perturb-lens run, resumed if OUT is there
  local out=$1; shift
  if done_run "$out"; then echo "done: $out"; return; fi
  local resume=(); [ -d "$out" ] && resume=(--resume)
  echo "+ $PL run $* --out $out ${resume[*]}"
  "$PL" run "$@" --out "$out" "${resume[@]}" --quiet
}

suite() {  # suite OUT CONFIG [OVERRIDES...]: perturb-lens sae run (it skips finished members)
  local out=$1; shift
  echo "+ $PL sae run $* --out $out"
  "$PL" sae run "$@" --out "$out" --quiet
}

for stage in ${*:-stable sens sae plateaus synthetic subst extrap webtext}; do
  for model in $MODELS; do
    dir=$ROOT/$model
    hook=blocks.$((LAYERS[$model] / 2)).hook_resid_pre
    at=(model="$model" hook="$hook")
    sae=$dir/sae_train_smollm2_layer15_topk_e2e/topk-k64
    saes="saes=[{label: topk-k64, sae: $sae}]"
    case $stage in
      stable) run "$dir/stable_regions" configs/stable_regions_smollm2.yaml data.n_seqs=100 "${at[@]}" ;;
      sens) run "$dir/sensitive_directions_lee" configs/replicate_sensitive_directions_smollm2.yaml \
              "${SENS_SIZE[@]}" "${at[@]}" ;;
      webtext) run "$dir/sensitive_directions_webtext" configs/replicate_sensitive_directions_smollm2.yaml \
              "data.source=$WEBTEXT" "${SENS_SIZE[@]}" "${at[@]}" ;;
      sae)
        if [ -f "$sae/eval.json" ]; then echo "done: $sae"; continue; fi
        out=$dir/sae_train_smollm2_layer15_topk_e2e; resume=(); [ -d "$out" ] && resume=(--resume)
        echo "+ $PL sae train ... ${at[*]} --out $out"
        "$PL" sae train configs/sae_train_smollm2_layer15_topk_e2e.yaml "${SAE_SIZE[@]}" "${at[@]}" \
          "data.n_seqs=${SAE_ROWS[$model]}" \
          --only topk-k64 --out "$out" "${resume[@]}" --quiet ;;
      plateaus) run "$dir/plateaus" configs/plateaus_smollm2.yaml data.n_seqs=100 "${at[@]}" "sae=$sae" ;;
      synthetic) run "$dir/synthetic_activations" configs/synthetic_activations_smollm2.yaml \
              data.n_seqs=100 "${at[@]}" "sae=$sae" ;;
      subst) suite "$dir/sae_substitution_smollm2" configs/sae_substitution_smollm2.yaml \
              base.data.n_seqs=12 "base.model=$model" "$saes" ;;
      extrap)
        suite "$dir/sae_error_extrapolation_smollm2" configs/sae_error_extrapolation_smollm2.yaml \
          "base.model=$model" "$saes"
        suite "$dir/sae_feature_extrapolation_smollm2" configs/sae_feature_extrapolation_smollm2.yaml \
          "base.model=$model" "$saes" ;;
      atlas)  # every third layer's resid_pre; 0.02 as well, where Gemma's 0.2 and 0.4 saturate
        resume=(); [ -d "runs/atlas/$model" ] && resume=(--resume)
        echo "+ $PL atlas $model --out runs/atlas/$model"
        "$PL" atlas "$model" --out "runs/atlas/$model" --n-seqs 16 --seq-len 32 \
          --length 0.02 --length 0.2 --length 0.4 "${resume[@]}" --quiet ;;
      *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
  done
done
