#!/usr/bin/env bash
# Builds an earlier revision's release origin and edge wasm into .local/baseline/<rev>/, so
# `gateway-bench --baseline` can measure the hit paths of that revision beside today's in one
# run. Prints the directory holding `gateway-origin`, `gateway-compute.wasm` and the revision's
# `tenants.json`. Idempotent:
# a revision already built is not built again.
set -euo pipefail
cd "$(dirname "$0")/.."

rev_arg="${1:?usage: scripts/bench-baseline.sh <git revision>}"
rev="$(git rev-parse --short=12 "$rev_arg^{commit}")"
root=".local/baseline/$rev"
out="$root/bin"
if [[ -x "$out/gateway-origin" && -f "$out/gateway-compute.wasm" && -f "$out/tenants.json" ]]; then
    echo "$out"
    exit 0
fi

# A detached copy of the tree (git archive, not a worktree: nothing to clean up in .git), with
# its own target directory, so the revision's build never shares fingerprints with ours.
rm -rf "$root/src"
mkdir -p "$root/src" "$out"
git archive "$rev" | tar -x -C "$root/src"
# The edge as that revision built it: its `edge` profile once it had one, release before.
profile=release
if grep -q '^\[profile\.edge\]' "$root/src/Cargo.toml"; then
    profile=edge
fi
(
    cd "$root/src"
    export CARGO_TARGET_DIR="$PWD/../target"
    cargo build --release -q -p gateway-origin >&2
    cargo build --profile "$profile" -q -p gateway-compute --target wasm32-wasip1 >&2
)
cp "$root/target/release/gateway-origin" "$out/"
cp "$root/target/wasm32-wasip1/$profile/gateway-compute.wasm" "$out/"
# Its own tenants file: today's may carry fields the revision does not know (and refuses).
cp "$root/src/fixtures/tenants.json" "$out/"
echo "$rev" > "$out/REVISION"
echo "$out"
