#!/usr/bin/env bash
# meshid local quickstart: builds meshid-ca and meshid-agent, starts a CA for example.org on
# embedded defaults (SQLite in ./.meshid/ca) and a node agent attested with a join token,
# registers a workload entry for this user, fetches its X.509-SVID and a JWT-SVID over the SPIFFE
# Workload API as any workload would, verifies the SVID with openssl, and keeps both running
# until Ctrl-C.
#   deploy/quickstart.sh          interactive: runs until Ctrl-C
#   deploy/quickstart.sh --once   non-interactive: stops after the demonstration
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[ "${1:-}" = "--once" ] && once=true

data=".meshid/ca"
sock="$data/admin.sock"
ops="127.0.0.1:${MESHID_QUICKSTART_OPS_PORT:-18081}"
node="127.0.0.1:${MESHID_QUICKSTART_NODE_PORT:-18443}"
agent_ops="127.0.0.1:${MESHID_QUICKSTART_AGENT_OPS_PORT:-18082}"
api_sock="$PWD/.meshid/agent/api.sock"
out=".meshid/svid"

echo "==> building meshid-ca and meshid-agent"
cargo build --quiet --release -p meshid-ca -p meshid-agent
bin=target/release/meshid-ca
agent=target/release/meshid-agent

mkdir -p .meshid
"$bin" run --trust-domain example.org --data-dir "$data" --ops-address "$ops" --node-address "$node" 2> .meshid/ca.log &
ca_pid=$!
agent_pid=
cleanup() {
  [ -n "$agent_pid" ] && kill -TERM "$agent_pid" 2>/dev/null || true
  kill -TERM "$ca_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 100); do
  "$bin" healthcheck -s "$sock" >/dev/null 2>&1 && break
  kill -0 "$ca_pid" 2>/dev/null || { echo "meshid-ca exited; see .meshid/ca.log"; cat .meshid/ca.log; exit 1; }
  sleep 0.1
done
echo "==> CA for spiffe://example.org is up (admin socket $sock, metrics http://$ops/metrics)"

echo "==> starting a node agent (join token attestation)"
"$bin" bundle show -s "$sock" > .meshid/bundle.pem
token_out=$("$bin" token generate -s "$sock")
token=$(echo "$token_out" | sed -n 's/^Token: //p')
token_id=$(echo "$token_out" | sed -n 's/^Token ID: //p')
agent_id="spiffe://example.org/meshid/agent/join_token/$token_id"
rm -rf .meshid/agent-data
"$agent" run --trust-domain example.org --server-address "$node" --trust-bundle .meshid/bundle.pem \
  --data-dir .meshid/agent-data --socket-path "$api_sock" --ops-address "$agent_ops" \
  --join-token "$token" 2> .meshid/agent.log &
agent_pid=$!
for _ in $(seq 1 100); do
  "$agent" healthcheck --ops-address "$agent_ops" >/dev/null 2>&1 && break
  kill -0 "$agent_pid" 2>/dev/null || { echo "meshid-agent exited; see .meshid/agent.log"; cat .meshid/agent.log; exit 1; }
  sleep 0.1
done
echo "    agent $agent_id is up (Workload API unix://$api_sock)"

echo "==> registering spiffe://example.org/demo/web for uid $(id -u) on that agent"
"$bin" entry delete -s "$sock" demo-web >/dev/null 2>&1 || true
"$bin" entry create -s "$sock" --id demo-web \
  --spiffe-id spiffe://example.org/demo/web --parent-id "$agent_id" \
  --selector "unix:uid:$(id -u)" --x509-ttl 1h --dns-name web.example.org >/dev/null
"$bin" entry list -s "$sock"

echo "==> fetching the SVID over the SPIFFE Workload API, as a workload"
for _ in $(seq 1 50); do
  "$agent" api fetch x509 -s "$api_sock" --write .meshid/workload >/dev/null 2>&1 && break
  sleep 0.1
done
"$agent" api fetch x509 -s "$api_sock" --write .meshid/workload
openssl verify -CAfile .meshid/workload/bundle.0.pem -untrusted .meshid/workload/svid.0.pem .meshid/workload/svid.0.pem
"$agent" api fetch jwt -s "$api_sock" --audience demo | cut -c1-60
echo "    ..."


echo "==> minting a debugging X.509-SVID directly from the CA into $out"
"$bin" x509 mint -s "$sock" --spiffe-id spiffe://example.org/demo/web --ttl 10m --out-dir "$out"
openssl verify -CAfile "$out/bundle.pem" -untrusted "$out/chain.pem" "$out/svid.pem"
openssl x509 -in "$out/svid.pem" -noout -subject -ext subjectAltName,keyUsage,extendedKeyUsage -dates


echo "==> CA keys and audit log"
"$bin" ca status -s "$sock"
"$bin" audit verify -s "$sock"

if $once; then
  echo "==> done (--once)"
  exit 0
fi
cat <<TXT

The CA and the agent keep running. Try, in another terminal:
  SPIFFE_ENDPOINT_SOCKET=unix://$api_sock   # for any SPIFFE client
  $agent api watch -s $api_sock             # see the SVID rotate
  $bin entry list -s $sock --output json
  $bin bundle show -s $sock --format spiffe
  $bin agent list -s $sock
  curl -s http://$ops/metrics | grep meshid_ca_svids_signed
  curl -s http://$agent_ops/metrics | grep meshid_agent_svids
Press Ctrl-C to stop both; the CA's state stays in $data for the next run.
TXT
wait "$ca_pid" "$agent_pid"
