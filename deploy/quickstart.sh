#!/usr/bin/env bash
# meshid local quickstart: builds meshid-ca, starts a CA for example.org on embedded defaults
# (SQLite in ./.meshid/ca), registers a workload entry, mints an X.509-SVID and a JWT-SVID,
# verifies the SVID with openssl, and keeps the CA running until Ctrl-C.
#   deploy/quickstart.sh          interactive: runs until Ctrl-C
#   deploy/quickstart.sh --once   non-interactive: stops after the demonstration
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[ "${1:-}" = "--once" ] && once=true

data=".meshid/ca"
sock="$data/admin.sock"
ops="127.0.0.1:${MESHID_QUICKSTART_OPS_PORT:-18081}"
out=".meshid/svid"

echo "==> building meshid-ca"
cargo build --quiet --release -p meshid-ca
bin=target/release/meshid-ca

mkdir -p .meshid
"$bin" run --trust-domain example.org --data-dir "$data" --ops-address "$ops" 2> .meshid/ca.log &
ca_pid=$!
cleanup() {
  kill -TERM "$ca_pid" 2>/dev/null || true
  wait "$ca_pid" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 100); do
  "$bin" healthcheck -s "$sock" >/dev/null 2>&1 && break
  kill -0 "$ca_pid" 2>/dev/null || { echo "meshid-ca exited; see .meshid/ca.log"; cat .meshid/ca.log; exit 1; }
  sleep 0.1
done
echo "==> CA for spiffe://example.org is up (admin socket $sock, metrics http://$ops/metrics)"

echo "==> registering spiffe://example.org/demo/web for uid $(id -u)"
"$bin" entry create -s "$sock" \
  --spiffe-id spiffe://example.org/demo/web \
  --parent-id spiffe://example.org/meshid/agent/quickstart \
  --selector "unix:uid:$(id -u)" --x509-ttl 1h --dns-name web.example.org \
  >/dev/null 2>&1 || echo "    (entry exists from an earlier run)"
"$bin" entry list -s "$sock"

echo "==> minting an X.509-SVID into $out"
"$bin" x509 mint -s "$sock" --spiffe-id spiffe://example.org/demo/web --ttl 10m --out-dir "$out"
openssl verify -CAfile "$out/bundle.pem" -untrusted "$out/chain.pem" "$out/svid.pem"
openssl x509 -in "$out/svid.pem" -noout -subject -ext subjectAltName,keyUsage,extendedKeyUsage -dates

echo "==> minting a JWT-SVID for audience 'demo'"
"$bin" jwt mint -s "$sock" --spiffe-id spiffe://example.org/demo/web --audience demo | cut -c1-60
echo "    ..."

echo "==> CA keys and audit log"
"$bin" ca status -s "$sock"
"$bin" audit verify -s "$sock"

if $once; then
  echo "==> done (--once)"
  exit 0
fi
cat <<TXT

The CA keeps running. Try, in another terminal:
  $bin bundle show -s $sock --format spiffe
  $bin entry list -s $sock --output json
  $bin token generate -s $sock
  curl -s http://$ops/metrics | grep meshid_ca_svids_signed
Press Ctrl-C to stop; the state stays in $data for the next run.
TXT
wait "$ca_pid"
