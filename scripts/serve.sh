#!/usr/bin/env bash
# `just serve`: the whole stack on loopback, in the foreground. Ctrl-C stops everything it
# started. Ports are overridable: REDIS_PORT, PROVIDER_PORT, FASTLY_API_PORT, ORIGIN_PORT, EDGE_PORT.
# ORIGIN_REPLICAS=N (default 1) runs N origins on ORIGIN_PORT+1..ORIGIN_PORT+N sharing the one
# Redis and fake Fastly API, behind a round-robin TCP proxy on ORIGIN_PORT (where the edge goes).
# REGIONS=2 adds a second origin region, `eu` (its own Redis on REDIS_PORT+1, its origin on
# EU_ORIGIN_PORT, default ORIGIN_PORT+10), beside the first, `us`; the two are each other's
# peers for purges, share the fake Fastly API (the one global KV store), and the edge tries
# `us` first, then `eu` (README, "Regions").
# USAGE_INGEST_TOKEN (default dev-usage-ingest-token, the origin's dev `usage.ingest_token`)
# authenticates the edge's usage records on their way to the origin's ingest route.
# REDIS_MODE=cluster (`just serve-cluster`) runs a six-node Redis Cluster (three primaries, three
# replicas) on REDIS_PORT..REDIS_PORT+5 instead of one Redis on REDIS_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_PORT=${REDIS_PORT:-6390}
PROVIDER_PORT=${PROVIDER_PORT:-9100}
FASTLY_API_PORT=${FASTLY_API_PORT:-9200}
ORIGIN_PORT=${ORIGIN_PORT:-8080}
EDGE_PORT=${EDGE_PORT:-7676}
ORIGIN_REPLICAS=${ORIGIN_REPLICAS:-1}
REGIONS=${REGIONS:-1}
EU_ORIGIN_PORT=${EU_ORIGIN_PORT:-$((ORIGIN_PORT + 10))}
# Development value only: what the regions send each other on the internal purge route.
REGION_PEER_TOKEN=${REGION_PEER_TOKEN:-dev-region-peer-token-0123456789}
REDIS_MODE=${REDIS_MODE:-single}
FASTLY_API_TOKEN=${FASTLY_API_TOKEN:-dev-fastly-token}
USAGE_INGEST_TOKEN=${USAGE_INGEST_TOKEN:-dev-usage-ingest-token}
STATE=.local/serve
mkdir -p "$STATE/redis"

if [ "$REGIONS" -eq 2 ] && [ "$REDIS_MODE" = cluster ]; then
    echo "serve: REGIONS=2 runs each region on one Redis node (REDIS_MODE=single)" >&2
    exit 2
fi
if [ "$REDIS_MODE" != single ] && [ "$REDIS_MODE" != cluster ]; then
    echo "serve: REDIS_MODE must be single or cluster (got '$REDIS_MODE')" >&2
    exit 1
fi
if ! [[ "$ORIGIN_REPLICAS" =~ ^[1-9][0-9]*$ ]]; then
    echo "serve: ORIGIN_REPLICAS must be a whole number of at least 1 (got '$ORIGIN_REPLICAS')" >&2
    exit 1
fi

if [ "$REGIONS" != 1 ] && [ "$REGIONS" != 2 ]; then
    echo "serve: REGIONS must be 1 or 2 (got '$REGIONS')" >&2
    exit 1
fi

pids=()
# Origins behind the proxy: one may die (or be killed to watch the failover) without stopping
# the rest of the stack.
replica_pids=()
cleanup() {
    trap - INT TERM EXIT
    echo "serve: stopping"
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

# run NAME COLOR CMD...: start CMD with its output prefixed by NAME.
run() {
    local name=$1 color=$2
    shift 2
    "$@" > >(sed -u "s/^/\x1b[${color}m${name}\x1b[0m | /") 2>&1 &
    pids+=($!)
}

# wait_port NAME PORT: until the last started process listens on PORT (or dies).
wait_port() {
    local name=$1 port=$2 pid=${pids[-1]}
    for _ in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            sleep 0.2
            echo "serve: $name exited during start-up (see its output above)" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "serve: $name did not start on port $port" >&2
    exit 1
}

if [ "$REDIS_MODE" = single ]; then
    run "redis   " 31 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --maxmemory 256mb --maxmemory-policy allkeys-lru --dir "$STATE/redis"
    wait_port redis "$REDIS_PORT"
    redis_env=(GATEWAY__REDIS__URL="redis://127.0.0.1:$REDIS_PORT")
    redis_banner="redis   127.0.0.1:$REDIS_PORT"
else
    # A fresh cluster each time: the nodes' config files (topology) are not kept.
    rm -rf "$STATE/redis-cluster"
    nodes=() seeds=()
    for i in 0 1 2 3 4 5; do
        port=$((REDIS_PORT + i))
        mkdir -p "$STATE/redis-cluster/$port"
        run "redis$i  " 31 redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file nodes.conf --cluster-node-timeout 1000 --repl-diskless-sync-delay 0 \
            --save '' --appendonly no --maxmemory 128mb --maxmemory-policy allkeys-lru \
            --dir "$STATE/redis-cluster/$port"
        wait_port "redis$i" "$port"
        nodes+=("127.0.0.1:$port")
        seeds+=("redis://127.0.0.1:$port")
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
    for _ in $(seq 1 150); do
        ok=0
        for i in 0 1 2 3 4 5; do
            redis-cli -p $((REDIS_PORT + i)) CLUSTER INFO | grep -q 'cluster_state:ok' && ok=$((ok + 1))
        done
        [ "$ok" -eq 6 ] && break
        sleep 0.2
    done
    if [ "$ok" -ne 6 ]; then
        echo "serve: the Redis Cluster did not reach cluster_state:ok" >&2
        exit 1
    fi
    redis_env=(GATEWAY__REDIS__MODE=cluster GATEWAY__REDIS__CLUSTER_URLS="$(IFS=,; echo "${seeds[*]}")")
    redis_banner="redis   cluster 127.0.0.1:$REDIS_PORT..$((REDIS_PORT + 5)) (3 primaries, 3 replicas)"
fi

if [ -n "${OPENAI_API_KEY:-}" ]; then
    echo "serve: OPENAI_API_KEY is set: the origin routes to the real OpenAI API"
    origin_config=origin/config/dev-openai.toml
else
    run "provider" 32 target/release/mock-provider --addr "127.0.0.1:$PROVIDER_PORT" --latency-ms "${PROVIDER_LATENCY_MS:-300}"
    wait_port mock-provider "$PROVIDER_PORT"
    origin_config=origin/config/dev.toml
fi

# The Config Store starts with the edge's tenants, as the production store would hold them.
run "kv-api  " 33 target/release/fake-fastly-api --addr "127.0.0.1:$FASTLY_API_PORT" \
    --token "$FASTLY_API_TOKEN" --config-seed fixtures/edge/tenants.json
wait_port fake-fastly-api "$FASTLY_API_PORT"

# With two regions each origin reads the dev settings plus its [region] section.
if [ "$REGIONS" -eq 2 ]; then
    run "redis-eu" 31 redis-server --port "$((REDIS_PORT + 1))" --bind 127.0.0.1 --save '' --appendonly no \
        --maxmemory 256mb --maxmemory-policy allkeys-lru --dir "$STATE/redis"
    wait_port redis-eu "$((REDIS_PORT + 1))"
    # region_config NAME PEER PEER_PORT: the dev settings plus this region's name and peer.
    region_config() {
        local file="$STATE/origin-$1.toml"
        cp "$origin_config" "$file"
        printf '\n[region]\nname = "%s"\npeer_token = "%s"\npeers = [{ name = "%s", url = "http://127.0.0.1:%s" }]\n' \
            "$1" "$REGION_PEER_TOKEN" "$2" "$3" >> "$file"
        echo "$file"
    }
    us_config=$(region_config us eu "$EU_ORIGIN_PORT")
    eu_config=$(region_config eu us "$ORIGIN_PORT")
    origin_config=$us_config
fi

# start_origin NAME PORT [REDIS_PORT [CONFIG]]: one origin listening on PORT.
start_origin() {
    local name=$1 port=$2 config=${4:-$origin_config}
    local origin_redis=("${redis_env[@]}")
    if [ -n "${3:-}" ]; then origin_redis=(GATEWAY__REDIS__URL="redis://127.0.0.1:$3"); fi
    run "$name" 34 env \
        GATEWAY__SERVER__LISTEN="127.0.0.1:$port" \
        "${origin_redis[@]}" \
        MOCK_PROVIDER_URL="http://127.0.0.1:$PROVIDER_PORT/v1" \
        MOCK_PROVIDER_API_KEY=mock \
        FASTLY_API_URL="http://127.0.0.1:$FASTLY_API_PORT" \
        FASTLY_API_TOKEN="$FASTLY_API_TOKEN" \
        GATEWAY__USAGE__INGEST_TOKEN="$USAGE_INGEST_TOKEN" \
        target/release/gateway-origin --config "$config"
    wait_port "$name" "$port"
}

if [ "$ORIGIN_REPLICAS" -eq 1 ]; then
    start_origin "origin  " "$ORIGIN_PORT"
    # With two regions either may die (to watch the failover) without stopping the stack.
    [ "$REGIONS" -eq 1 ] || replica_pids+=("${pids[-1]}")
    origins="origin  http://127.0.0.1:$ORIGIN_PORT      (/metrics, /dashboard)"
else
    upstreams=()
    origins="proxy   http://127.0.0.1:$ORIGIN_PORT      (round robin over $ORIGIN_REPLICAS origins)"
    for i in $(seq 1 "$ORIGIN_REPLICAS"); do
        port=$((ORIGIN_PORT + i))
        start_origin "$(printf 'origin%-2s' "$i")" "$port"
        replica_pids+=("${pids[-1]}")
        upstreams+=(--upstream "127.0.0.1:$port")
        origins+=$'\n'"  origin$i http://127.0.0.1:$port      (/metrics, /dashboard)"
    done
    run "proxy   " 36 target/release/round-robin-proxy --listen "127.0.0.1:$ORIGIN_PORT" "${upstreams[@]}"
    wait_port round-robin-proxy "$ORIGIN_PORT"
fi

# The edge's manifest points its origin backend at ORIGIN_PORT.
sed "s#url = \"http://127.0.0.1:8080\"#url = \"http://127.0.0.1:$ORIGIN_PORT\"#" fastly.toml > "$STATE/fastly.toml"
if [ "$REGIONS" -eq 2 ]; then
    start_origin "origin-eu" "$EU_ORIGIN_PORT" "$((REDIS_PORT + 1))" "$eu_config"
    replica_pids+=("${pids[-1]}")
    origins+=$'\n'"  origin-eu http://127.0.0.1:$EU_ORIGIN_PORT  (region eu; us is the one above)"
    # One backend per region, and the order the edge tries them in.
    sed -i 's#^\[local_server.config_stores.edge_config.contents\]$#&\nregions = '"'"'{"default":["us","eu"]}'"'"'#' "$STATE/fastly.toml"
    printf '\n[local_server.backends.origin_us]\nurl = "http://127.0.0.1:%s"\n\n[local_server.backends.origin_eu]\nurl = "http://127.0.0.1:%s"\n' \
        "$ORIGIN_PORT" "$EU_ORIGIN_PORT" >> "$STATE/fastly.toml"
fi
# Viceroy writes the edge's `usage` log endpoint to its stdout (`usage :: <record>`). The
# usage-forwarder stands in for Fastly's log delivery: it echoes every line on, and POSTs those
# records in batches to the origin's ingest route. `exec` keeps the pid `run` tracks Viceroy's
# own, so stopping it closes the pipe, and the forwarder sends what waits and exits. The token
# goes through the environment, not the command line, so `ps` does not show it.
run "edge    " 35 env USAGE_INGEST_TOKEN="$USAGE_INGEST_TOKEN" bash -c \
    'ingest=$1; shift; exec "$@" > >(exec target/release/usage-forwarder --ingest-url "$ingest") 2>&1' \
    edge "http://127.0.0.1:$ORIGIN_PORT/ingest/edge-usage" \
    viceroy -C "$STATE/fastly.toml" --addr "127.0.0.1:$EDGE_PORT" target/wasm32-wasip1/edge/gateway-compute.wasm
wait_port edge "$EDGE_PORT"

cat <<BANNER

  edge    http://127.0.0.1:$EDGE_PORT      (Fastly Compute under Viceroy)
  $origins
  $redis_banner   fake Fastly API (KV + Config Store) http://127.0.0.1:$FASTLY_API_PORT
  usage   the edge's "usage" log lines → POST http://127.0.0.1:$ORIGIN_PORT/ingest/edge-usage

  curl -si http://127.0.0.1:$EDGE_PORT/v1/chat/completions \\
    -H 'Authorization: Bearer sk-dev-acme' -H 'Content-Type: application/json' \\
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'

  Ctrl-C stops everything.

BANNER
essential=()
for pid in "${pids[@]}"; do
    [[ " ${replica_pids[*]} " == *" $pid "* ]] || essential+=("$pid")
done
wait -n "${essential[@]}"
echo "serve: a process exited; stopping the rest" >&2
exit 1
