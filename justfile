# The one way to set up, build, test and run the gateway. `just --list` shows every recipe.

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments := false

export PATH := env_var_or_default("CARGO_HOME", env_var("HOME") + "/.cargo") + "/bin:" + env_var("PATH")

viceroy_version := "0.22.0"
fastly_cli_version := "16.1.0"
wasm := "target/wasm32-wasip1/edge/gateway-compute.wasm"

default:
    @just --list

# Install what is missing: the wasm target, Viceroy, Redis, promtool, the Fastly CLI, the semantic cache's model. Idempotent.
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    rustup target add wasm32-wasip1 >/dev/null
    if [ "$(viceroy --version 2>/dev/null | awk '{print $2}')" != "{{viceroy_version}}" ]; then
        echo "setup: installing viceroy {{viceroy_version}} (slow on 2 cores: ~30 min, once)"
        cargo install viceroy --version {{viceroy_version}} --locked
    fi
    if ! command -v redis-server >/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            echo "setup: installing redis-server"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        else
            echo "setup: redis-server is missing; install it (apt-get install redis-server) and re-run" >&2
            exit 1
        fi
    fi
    # The Debian package starts a system-wide instance on 6379; we always run our own instances.
    if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
        systemctl stop redis-server || true
    fi
    # The dashboard's browser test (tests/tests/e2e/dashboard.rs) runs Debian's headless Chromium.
    if ! command -v chromium >/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            echo "setup: installing chromium (the dashboard's browser test)"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
        else
            echo "setup: chromium is missing; install it (apt-get install chromium) and re-run" >&2
            exit 1
        fi
    fi
    if ! command -v promtool >/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            echo "setup: installing promtool (Debian's prometheus package)"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
            # The package also starts a Prometheus server where init allows it; only promtool
            # is wanted (a server someone already ran is left alone: this is the install branch).
            if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
                systemctl disable --now prometheus >/dev/null 2>&1 || true
            fi
        else
            echo "setup: promtool is missing; install it (apt-get install prometheus) and re-run" >&2
            exit 1
        fi
    fi
    if ! command -v fastly >/dev/null; then
        echo "setup: installing the Fastly CLI {{fastly_cli_version}} from npm"
        npm install -g --silent @fastly/cli@{{fastly_cli_version}}
    fi
    just python-venv
    scripts/semantic-model.sh
    echo "setup: ok (viceroy $(viceroy --version | awk '{print $2}'), redis $(redis-server --version | awk '{print $3}' | cut -d= -f2), promtool $(promtool --version 2>&1 | head -1 | awk '{print $3}'), fastly $(fastly version 2>/dev/null | head -1 | awk '{print $4}'))"

# The official `openai` and `anthropic` Python clients in .local/venv (gitignored), for the
# real-client e2e tests.
python-venv:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! .local/venv/bin/python -c 'import openai, anthropic' 2>/dev/null; then
        echo "python-venv: installing the openai and anthropic packages into .local/venv"
        python3 -m venv .local/venv && .local/venv/bin/pip install -q 'openai>=1.50,<3' 'anthropic>=0.40,<1'
    fi

# Build the host crates (origin, fixtures, tests).
build:
    cargo build --all-targets

# Build the edge wasm (the `edge` profile: release, size-optimized; Cargo.toml says why).
build-edge:
    cargo build -p gateway-compute --profile edge --target wasm32-wasip1
    @ls -l {{wasm}} | awk '{print "build-edge: " $9 " " $5 " bytes"}'

# fmt check, the ops files (check-ops), clippy -D warnings on the host crates and on compute for wasm32-wasip1.
lint:
    cargo fmt --all -- --check
    just check-ops
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p gateway-compute -p gateway-common --target wasm32-wasip1 -- -D warnings

# The alert rules (promtool check, then their unit tests) and the Grafana dashboard (JSON, layout, PromQL).
check-ops:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v promtool >/dev/null; then
        echo "check-ops: promtool is missing; run just setup (apt-get install prometheus)" >&2
        exit 1
    fi
    promtool check rules ops/prometheus/alerts.yml
    promtool test rules ops/prometheus/alerts.test.yml
    python3 ops/grafana/check.py ops/grafana/gateway.json

# Run every test: unit, property, golden (host and wasm under Viceroy), integration, end-to-end.
# (The multi-replica e2e tests run target/debug/gateway-origin as processes; `cargo test
# --workspace` builds it, since the origin has integration tests of its own.)
test: setup build-edge
    cargo test --workspace --no-fail-fast
    just test-wasm
    just test-cluster

# The cache-behaviour e2e modules again with every stack on a local six-node Redis Cluster
# (GATEWAY_E2E_REDIS=cluster); the origin's own cluster tests (kill -9, reshard) are in `test`.
# Every cargo command here selects the whole workspace, as `test` does: the features cargo
# unifies then match (the origin's dev-dependencies turn on tokio's test-util), so after `test`
# nothing is compiled again, where `-p gateway-e2e` built a second copy of the origin and its
# dependencies. `--no-run` builds target/debug/gateway-origin, which the e2e stacks start.
test-cluster: build-edge
    cargo test --workspace --no-run
    GATEWAY_E2E_REDIS=cluster cargo test --workspace --test e2e --no-fail-fast -- \
        walk:: isolation:: cross_replica:: dual_write:: tenant_purge:: streaming:: faults:: shared_state::

# Golden vectors compiled to wasm32-wasip1 and run in Viceroy (edge and origin agree on keys and
# sealed entries),
# and the edge's own unit tests, which only link for wasm32-wasip1.
test-wasm:
    CARGO_TARGET_WASM32_WASIP1_RUNNER="viceroy run" \
        cargo test -p gateway-common --target wasm32-wasip1 --test golden
    CARGO_TARGET_WASM32_WASIP1_RUNNER="viceroy run" \
        cargo test -p gateway-common --target wasm32-wasip1 --test golden_seal
    CARGO_TARGET_WASM32_WASIP1_RUNNER="viceroy run" \
        cargo test -p gateway-compute --target wasm32-wasip1

# The semantic cache's evaluation: the real model and the LSH index on a redis-server it starts,
# over fixtures/semantic/pairs.jsonl; rewrites docs/semantic-eval.md and docs/semantic-eval.svg.
# (The dev profile: the model's numeric crates are optimised there too, see Cargo.toml.)
eval-semantic: setup
    cargo run -q -p gateway-bench --bin semantic-eval

# The semantic cache's costs only (embedding, lookup, hit latency, origin RSS); prints, writes nothing.
bench-semantic: setup bench-tools
    cargo build --release -p gateway-origin -p gateway-bench
    target/release/gateway-bench --part semantic --semantic-samples 100

# Regenerate the edge's local Config Store `tenants` from fixtures/tenants.json.
edge-tenants:
    cargo run -q -p gateway-e2e --bin edge-tenants -- fixtures/tenants.json > fixtures/edge/tenants.json

# The edge under Viceroy on 127.0.0.1:7676 (Fastly CLI, offline).
serve-edge: build-edge
    mkdir -p bin && cp {{wasm}} bin/main.wasm
    fastly compute serve --skip-build --viceroy-path "$(command -v viceroy)" --addr "127.0.0.1:${EDGE_PORT:-7676}"

# (ORIGIN_REPLICAS=N runs N origins on :8081.. behind a round-robin proxy on :8080.)
# The whole stack on loopback: Redis, mock provider, fake Fastly API, origin (:8080), edge (:7676).
serve: setup build-edge
    cargo build --release -p gateway-origin -p gateway-fixtures --bins
    scripts/serve.sh

# `just serve` on a local six-node Redis Cluster (three primaries, three replicas) instead of one Redis.
serve-cluster:
    REDIS_MODE=cluster just serve

# Install the load generator `oha` into ~/.cargo/bin when it is missing (a few minutes, once),
# and valgrind (callgrind counts the instructions of a hit; apt, when root).
bench-tools:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v oha >/dev/null; then
        echo "bench-tools: installing oha from crates.io"
        cargo install oha --locked
    fi
    if ! command -v callgrind_control >/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            echo "bench-tools: installing valgrind"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
        else
            echo "bench-tools: valgrind is missing; install it (apt-get install valgrind) and re-run" >&2
            exit 1
        fi
    fi

# Build what the benchmarks run: the origin and bench binaries (release), both wasm services.
bench-build: build-edge
    cargo build --release -p gateway-origin -p gateway-bench
    cargo build --profile edge -p gateway-bench-bare-compute --target wasm32-wasip1
    cargo build --release -p gateway-bench-seal-wasm --target wasm32-wasip1

# Every tier against its floor in one run (~5 min); rewrites bench/REPORT.md and bench/latency.png.
bench: setup bench-tools bench-build
    target/release/gateway-bench --report bench/REPORT.md --chart bench/latency.png --notes bench/NOTES.md

# Only the origin's Redis-hit path against a bare actix-web handler (prints; writes nothing).
bench-origin: setup bench-tools bench-build
    target/release/gateway-bench --part origin-hit

# Today's origin and edge hit paths beside those of an earlier revision REV, in one run (its
# release origin and edge are built once into .local/baseline/REV): only the judged pair and the
# floors, 6 rounds (~8 min), then both origins' instructions per hit; prints, writes nothing.
bench-against REV: setup bench-tools bench-build
    #!/usr/bin/env bash
    set -euo pipefail
    dir="$(scripts/bench-baseline.sh {{REV}})"
    target/release/gateway-bench --part origin-hit --part edge-hit --part instructions \
        --baseline "$dir" --judged-only --rounds 6

# Also LiteLLM's Redis-cache hit as a peer (LiteLLM from PyPI in .local/bench-venv); not in CI.
bench-peers: setup bench-tools bench-build
    #!/usr/bin/env bash
    set -euo pipefail
    if ! .local/bench-venv/bin/litellm --version >/dev/null 2>&1; then
        echo "bench-peers: installing litellm[proxy] into .local/bench-venv"
        python3 -m venv .local/bench-venv
        .local/bench-venv/bin/pip install -q 'litellm[proxy]>=1.50,<2' redis
    fi
    target/release/gateway-bench --litellm .local/bench-venv/bin/litellm \
        --report bench/REPORT.md --chart bench/latency.png --notes bench/NOTES.md
