#!/usr/bin/env bash
# Multi30k en->de on this CPU: the small preset trained from scratch without the prior, then with a late prior
# (switched on after 60% of training). Prints test_2016_flickr BLEU, chrF, APL and nonlinear fraction of both.
# Usage: bash benchmarks/multi30k.sh [extra recipe flags, e.g. --num_train_epochs 4]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/benchmark_multi30k}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python recipes/translate_wmt.py --config recipes/configs/multi30k.yaml --output_dir "$out/no_prior" \
    --prior_lambda 0 "$@"
mkdir -p "$out/late_prior"
cp -r "$out/no_prior/tokenizer" "$out/late_prior/"   # same vocabulary for both runs
python recipes/translate_wmt.py --config recipes/configs/multi30k.yaml --output_dir "$out/late_prior" "$@"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
print(f"\n{'run':<12} {'BLEU':>6} {'chrF':>6} {'APL(norm)':>10} {'APL(unnorm)':>12} {'nonlinear':>10} {'train min':>10}")
for run in ("no_prior", "late_prior"):
    r = json.loads((Path(sys.argv[1]) / run / "results.json").read_text())
    t, pl = r["scores"]["test"], r["path_length"]
    print(f"{run:<12} {t['bleu']:>6.2f} {t['chrf']:>6.2f} {pl['normalized_apl']:>10.3f} {pl['unnormalized_apl']:>12.3f} "
          f"{r['summary']['total']['nonlinear_fraction']:>10.3f} {r['train']['runtime_s'] / 60:>10.1f}")
print(f"(full depth: normalized {pl['depth']['normalized']:.3f}, unnormalized {pl['depth']['unnormalized']:.3f}; "
      "test set test_2016_flickr, 1000 sentences)")
PY
