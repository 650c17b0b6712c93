#!/usr/bin/env bash
# meshid local quickstart: a whole mesh on this machine, on loopback, without root.
#
#   deploy/quickstart.sh          build, start, demonstrate, then keep running until Ctrl-C
#   deploy/quickstart.sh --once   build, start, demonstrate, stop everything (for CI)
#   --trust                       also demonstrate the trust lifecycle under the running mesh:
#                                 `ca taint` of the issuing intermediate, `svid revoke` of
#                                 api's SVID, and a root rotation (prepare, activate once
#                                 every agent has the new root)
#
# It builds meshid-ca, meshid-agent, meshid-proxy and the demo service (meshid-demo, from
# tests/src/bin), then starts, all on 127.0.0.1:
#   - a CA for spiffe://example.org on embedded defaults (SQLite in .meshid/ca);
#   - a node agent attested with a join token, serving the SPIFFE Workload API;
#   - two demo HTTP services, web and api, each behind its own meshid-proxy (explicit mode:
#     an inbound mTLS listener in front of the service, an outbound listener to the other one);
# registers an entry per proxy (same uid, told apart by their binary paths, unix:path), applies
# the policy in deploy/quickstart/policy.yaml (web may call api; api may not call web), and
# shows an allowed call, a refused one, and why it was refused. The proxies' configs, the
# policy and every log are in the data directory. Ctrl-C (or SIGTERM) stops everything it
# started, and so does any failure along the way. tests/tests/e2e/quickstart.rs runs it.
#
# Environment:
#   MESHID_QUICKSTART_DIR    state, configs and logs (default: .meshid in the repository)
#   MESHID_BIN_DIR           use the meshid-ca, meshid-agent, meshid-proxy and meshid-demo
#                            binaries in this directory and skip the build
#   MESHID_DEMO_BIN          the meshid-demo binary (default: MESHID_BIN_DIR/meshid-demo)
#   MESHID_QUICKSTART_*_PORT the ports, all on 127.0.0.1 (defaults below)
# Needs curl (and openssl to verify the fetched SVID, skipped without it).

# shellcheck disable=SC2154 # port() assigns the address variables with printf -v
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."
root=$(pwd -P)

usage() { sed -n '2,10p' "$root/deploy/quickstart.sh" | sed 's/^# \{0,1\}//'; }
once=false
trust=false
for arg in "$@"; do
  case "$arg" in
    --once) once=true ;;
    --trust) trust=true ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 64 ;;
  esac
done
command -v curl >/dev/null 2>&1 || {
  echo "quickstart: curl is needed to call the demo services (apt-get install curl)" >&2
  exit 1
}

absolute() { case "$1" in /*) echo "$1" ;; *) echo "$caller_dir/$1" ;; esac; }
dir=$(absolute "${MESHID_QUICKSTART_DIR:-$root/.meshid}")
mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P) # physical: unix:path selectors name real paths
ports=()
port() { # VAR NAME DEFAULT: VAR=127.0.0.1:$MESHID_QUICKSTART_<NAME>_PORT, or the default
  local env="MESHID_QUICKSTART_${2}_PORT"
  printf -v "$1" '127.0.0.1:%s' "${!env:-$3}"
  ports+=("$env=${!env:-$3}")
}
port ca_ops OPS 18081
port ca_node NODE 18443
port ca_console CONSOLE 18480           # the CA's web console (this host only)
port agent_ops AGENT_OPS 18082
port web_app WEB 18100                  # the web service, plaintext
port web_in WEB_INBOUND 18101           # web's proxy: mTLS in front of web
port web_out WEB_OUTBOUND 18102         # web's proxy: web calls api here, plaintext
port web_proxy_ops WEB_PROXY_OPS 18103
port api_app API 18200
port api_in API_INBOUND 18201
port api_out API_OUTBOUND 18202         # api calls web here
port api_proxy_ops API_PROXY_OPS 18203

ca_data=$dir/ca
admin_sock=$ca_data/admin.sock
api_sock=$dir/agent/api.sock
logs=$dir/logs
td=example.org
uid=$(id -u)

# Shown paths are relative to the repository when they are inside it.
show() { case "$1" in "$root"/*) echo "${1#"$root"/}" ;; *) echo "$1" ;; esac; }
step() { echo "==> $*"; }

# ---- processes: every one started is recorded, and all are stopped on exit ----------------
pids=()
declare -A names=() logfile=()
rm -f "$dir/pids"
start() { # NAME LOG COMMAND...: start in the background, stderr and stdout to LOG
  local name=$1 log=$2
  shift 2
  "$@" >>"$log" 2>&1 &
  pids+=("$!")
  names[$!]=$name
  logfile[$!]=$log
  echo "$! $name" >>"$dir/pids"
}
fail() { # MESSAGE [LOG]: print the message and the end of the log, then exit (and clean up)
  echo "quickstart: $1" >&2
  if [ -n "${2:-}" ]; then
    echo "---- last lines of $(show "$2") ----" >&2
    tail -n 30 "$2" >&2 || true
  fi
  exit 1
}
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  local status=$?
  trap '' INT TERM # a second Ctrl-C does not interrupt the cleanup (bounded below)
  if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local p
    for _ in $(seq 1 100); do # proxies drain for at most 2 s; give everything 10 s
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && break; p=; done
      [ -z "$p" ] && break
      sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    echo "==> stopped ${#pids[@]} processes (CA, agent, services, proxies); state and logs stay in $(show "$dir")"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_ready() { # PID SECONDS COMMAND...: poll COMMAND until it succeeds, while PID lives
  local pid=$1 tries=$(($2 * 10))
  shift 2
  for _ in $(seq 1 "$tries"); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || fail "${names[$pid]} exited" "${logfile[$pid]}"
    sleep 0.1
  done
  fail "${names[$pid]} not ready after $2 s" "${logfile[$pid]}"
}

# ---- binaries ------------------------------------------------------------------------------
if [ -n "${MESHID_BIN_DIR:-}" ]; then
  bin=$(cd "$(absolute "$MESHID_BIN_DIR")" && pwd -P)
else
  if [ -x target/release/meshid-ca ] && [ -x target/release/meshid-demo ]; then
    step "building meshid-ca, meshid-agent, meshid-proxy and meshid-demo (cargo build --release; seconds when little changed)"
  else
    # The first build compiles about 250 crates: say so, and let cargo show its progress,
    # rather than sit silent for minutes.
    step "building meshid-ca, meshid-agent, meshid-proxy and meshid-demo (cargo build --release)"
    step "first build: about 250 crates, roughly 5 to 10 minutes on 2 cores (later runs take seconds)"
  fi
  cargo build --release -p meshid-ca -p meshid-agent -p meshid-proxy -p meshid-tests \
    --bin meshid-ca --bin meshid-agent --bin meshid-proxy --bin meshid-demo
  bin=$(cd target/release && pwd -P)
fi
ca=$bin/meshid-ca
agent=$bin/meshid-agent
proxy=$bin/meshid-proxy
demo=$(absolute "${MESHID_DEMO_BIN:-$bin/meshid-demo}")
for b in "$ca" "$agent" "$proxy" "$demo"; do
  [ -x "$b" ] || fail "$b is missing (build it, or set MESHID_BIN_DIR / MESHID_DEMO_BIN)"
done
# Both proxies run as you; the agent tells them apart by their binary's path (unix:path), so
# each gets its own copy of meshid-proxy.
mkdir -p "$dir/bin"
for p in web-proxy api-proxy; do
  cmp -s "$proxy" "$dir/bin/$p" || { rm -f "$dir/bin/$p"; cp "$proxy" "$dir/bin/$p"; }
done
for p in "${ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/${p#*=}") 2>/dev/null; then
    fail "127.0.0.1:${p#*=} is in use (is another quickstart running?); pick another port with ${p%%=*}"
  fi
done

rm -rf "$logs" "$dir/agent" "$dir/svid"
mkdir -p "$logs" "$dir/agent"

# ---- CA ------------------------------------------------------------------------------------
start meshid-ca "$logs/ca.log" "$ca" run --trust-domain "$td" --data-dir "$ca_data" \
  --ops-address "$ca_ops" --node-address "$ca_node" --console-address "$ca_console"
wait_ready "${pids[-1]}" 30 "$ca" healthcheck --ops-address "$ca_ops"
step "CA for spiffe://$td is up (SQLite in $(show "$ca_data"), admin socket $(show "$admin_sock"))"
step "console: http://$ca_console (read-only; identities, keys, policy, activity)"

# ---- agent ---------------------------------------------------------------------------------
"$ca" bundle show -s "$admin_sock" >"$dir/agent/bundle.pem"
token_out=$("$ca" token generate -s "$admin_sock" --ttl 10m)
token=$(sed -n 's/^Token: //p' <<<"$token_out")
agent_id="spiffe://$td/meshid/agent/join_token/$(sed -n 's/^Token ID: //p' <<<"$token_out")"
start meshid-agent "$logs/agent.log" "$agent" run --trust-domain "$td" \
  --server-address "$ca_node" --trust-bundle "$dir/agent/bundle.pem" \
  --data-dir "$dir/agent/data" --socket-path "$api_sock" --ops-address "$agent_ops" \
  --join-token="$token" # "=": a token may start with "-"
wait_ready "${pids[-1]}" 30 "$agent" healthcheck --ops-address "$agent_ops"
step "agent is up: $agent_id (Workload API unix://$(show "$api_sock"))"

# ---- entries -------------------------------------------------------------------------------
entry() { # ID SPIFFE_ID BINARY: an entry for processes of this uid running BINARY
  "$ca" entry delete -s "$admin_sock" "$1" >/dev/null 2>&1 || true
  "$ca" entry create -s "$admin_sock" --id "$1" --spiffe-id "$2" --parent-id "$agent_id" \
    --selector "unix:uid:$uid" --selector "unix:path:$3" --x509-ttl 1m >/dev/null
  printf '    %-28s <- unix:uid:%s + unix:path:%s\n' "$2" "$uid" "$(show "$3")"
}
step "registering entries on that agent (X.509-SVIDs live 1 minute, rotated at half-life)"
entry quickstart-web "spiffe://$td/web" "$dir/bin/web-proxy"
entry quickstart-api "spiffe://$td/api" "$dir/bin/api-proxy"
entry quickstart-cli "spiffe://$td/cli" "$(readlink -f "$agent")"

# ---- services and proxies ------------------------------------------------------------------
cp deploy/quickstart/policy.yaml "$dir/policy.yaml"
proxy_config() { # NAME APP INBOUND OUTBOUND OPS PEER PEER_INBOUND
  cat <<TOML
# $1's sidecar, written by deploy/quickstart.sh (rewritten on every run).
workload_api_socket = "unix://$api_sock"
spiffe_id = "spiffe://$td/$1"
ops_address = "$5"
policy_file = "$dir/policy.yaml"
access_log = "$logs/$1-access.log"
drain_timeout = "2s"

# Callers reach $1 over mTLS here; the proxy checks the policy and forwards to $1.
[[inbound]]
name = "$1"
listen = "$3"
forward_to = "$2"
port = 8080
protocol = "http"

# $1 calls $6 in plaintext here; the proxy opens mTLS to $6's proxy and checks its ID.
[[outbound]]
name = "to-$6"
listen = "$4"
upstream = "$7"
expect = "spiffe://$td/$6"
TOML
}
proxy_config web "$web_app" "$web_in" "$web_out" "$web_proxy_ops" api "$api_in" >"$dir/web-proxy.toml"
proxy_config api "$api_app" "$api_in" "$api_out" "$api_proxy_ops" web "$web_in" >"$dir/api-proxy.toml"
for p in web api; do
  out=$("$proxy" run --config "$dir/$p-proxy.toml" --check 2>&1) || fail "$(show "$dir/$p-proxy.toml"): $out"
done

start web "$logs/web.log" "$demo" --name web --listen "$web_app"
wait_ready "${pids[-1]}" 10 curl -sf -o /dev/null "http://$web_app/"
start api "$logs/api.log" "$demo" --name api --listen "$api_app"
wait_ready "${pids[-1]}" 10 curl -sf -o /dev/null "http://$api_app/"
start web-proxy "$logs/web-proxy.log" "$dir/bin/web-proxy" run --config "$dir/web-proxy.toml"
start api-proxy "$logs/api-proxy.log" "$dir/bin/api-proxy" run --config "$dir/api-proxy.toml"
wait_ready "${pids[-2]}" 30 "$proxy" healthcheck --ops-address "$web_proxy_ops"
wait_ready "${pids[-1]}" 30 "$proxy" healthcheck --ops-address "$api_proxy_ops"
step "services and proxies are up, each proxy with its own SVID:"
echo "    web  http://$web_app  <- mTLS $web_in  (web-proxy; web calls api at http://$web_out)"
echo "    api  http://$api_app  <- mTLS $api_in  (api-proxy; api calls web at http://$api_out)"
echo "    policy $(show "$dir/policy.yaml"): web may GET api's /hello; nothing else is allowed"

# ---- an allowed call -----------------------------------------------------------------------
call() { # URL: prints the HTTP status, the body in $dir/last-body
  curl -sS -o "$dir/last-body" -w '%{http_code}' --max-time 10 "$1" || echo 000
}
step "web calls api: curl http://$web_out/hello"
code=$(call "http://$web_out/hello")
[ "$code" = 200 ] || fail "web -> api answered $code, expected 200" "$logs/api-proxy.log"
echo "    $code $(cat "$dir/last-body")"

# ---- a refused call, and why ---------------------------------------------------------------
step "api calls web: curl http://$api_out/hello"
code=$(call "http://$api_out/hello")
[ "$code" = 403 ] || fail "api -> web answered $code, expected 403" "$logs/web-proxy.log"
echo "    $code refused by web's proxy. Why?"
for _ in $(seq 1 50); do
  grep -q '"decision":"deny"' "$logs/web-access.log" 2>/dev/null && break
  sleep 0.1
done
if line=$(grep -m1 'refused by policy' "$logs/web-proxy.log"); then
  echo "    its log, $(show "$logs/web-proxy.log"):"
  echo "    refused by policy${line##*refused by policy}"
elif [ -z "${MESHID_LOG:-}" ]; then # (a MESHID_LOG filter above info hides the line)
  fail "no 'refused by policy' line in web's proxy log" "$logs/web-proxy.log"
fi
echo "    its access log, $(show "$logs/web-access.log"):"
record=$(grep -m1 '"decision":"deny"' "$logs/web-access.log") ||
  fail "no deny record in web's access log" "$logs/web-proxy.log"
echo "    $record"
echo "    and the policy, explained: meshid-proxy policy explain $(show "$dir/policy.yaml") --from spiffe://$td/api --to spiffe://$td/web --port 8080 --method GET --path /hello"
"$proxy" policy explain "$dir/policy.yaml" --from "spiffe://$td/api" --to "spiffe://$td/web" \
  --port 8080 --method GET --path /hello | sed 's/^/    /'

# ---- an SVID over the Workload API, as any workload ----------------------------------------
step "fetching an X.509-SVID over the Workload API as a workload: meshid-agent api fetch x509 (spiffe://$td/cli)"
for _ in $(seq 1 50); do
  "$agent" api fetch x509 -s "$api_sock" --write "$dir/svid" >"$dir/svid.txt" 2>&1 && break
  sleep 0.1
done
grep -q "^SPIFFE ID: spiffe://$td/cli" "$dir/svid.txt" || fail "no SVID for spiffe://$td/cli" "$dir/svid.txt"
grep -E '^(SPIFFE ID|Valid until):' "$dir/svid.txt" | sed 's/^/    /'
if command -v openssl >/dev/null 2>&1; then
  openssl verify -CAfile "$dir/svid/bundle.0.pem" -untrusted "$dir/svid/svid.0.pem" \
    "$dir/svid/svid.0.pem" | sed "s|^$dir/svid/|    openssl verify: |"
fi

# ---- the trust lifecycle under the running mesh (--trust) -----------------------------------
if $trust; then
  cactl() { "$ca" "$@" -s "$admin_sock"; }
  rotations() { curl -s "http://$1/metrics" | awk '/^meshid_proxy_svid_rotations_total/ {print $2}'; }
  intermediate=$(cactl ca status | awk '$1 == "x509_intermediate" && $2 == "active" {print $3; exit}')
  [ -n "$intermediate" ] || fail "no active intermediate in ca status" "$logs/ca.log"
  before=$(rotations "$web_proxy_ops")
  step "suspecting a leaked key: meshid-ca ca taint $intermediate --reason 'quickstart demo'"
  cactl ca taint "$intermediate" --reason "quickstart demo" | sed 's/^/    /'
  for _ in $(seq 1 100); do
    cactl ca status | grep -q "Taint $intermediate: nothing it signed is left" && break
    sleep 0.1
  done
  cactl ca status | grep -E "^Taint |TAINTED" | sed 's/^/    /'
  cactl ca status | grep -q "Taint $intermediate: nothing it signed is left" ||
    fail "the SVIDs of the tainted intermediate were not all replaced" "$logs/ca.log"
  echo "    web's proxy rotated its SVID: $(rotations "$web_proxy_ops") rotations (was $before), no restart"
  code=$(call "http://$web_out/hello")
  [ "$code" = 200 ] || fail "web -> api answered $code after the taint" "$logs/api-proxy.log"
  echo "    web calls api: $code"

  metric() { curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
  before=$(rotations "$api_proxy_ops")
  step "revoking api's SVID: meshid-ca svid revoke --spiffe-id spiffe://$td/api --reason 'quickstart demo'"
  cactl svid revoke --spiffe-id "spiffe://$td/api" --reason "quickstart demo" | sed 's/^/    /'
  for _ in $(seq 1 100); do
    [ "$(metric "$web_proxy_ops" meshid_proxy_revoked_certificates)" != 0 ] &&
      [ "$(rotations "$api_proxy_ops")" != "$before" ] && break
    sleep 0.1
  done
  listed=$(metric "$web_proxy_ops" meshid_proxy_revoked_certificates)
  [ "${listed:-0}" != 0 ] || fail "web's proxy did not receive the CRL" "$logs/web-proxy.log"
  [ "$(rotations "$api_proxy_ops")" != "$before" ] ||
    fail "api's proxy did not get a fresh SVID after the revocation" "$logs/api-proxy.log"
  echo "    web's proxy refuses the $listed revoked certificate(s) and closed its connections to them; api's proxy has a fresh SVID, no restart"
  code=$(call "http://$web_out/hello")
  [ "$code" = 200 ] || fail "web -> api answered $code after the revocation" "$logs/api-proxy.log"
  echo "    web calls api: $code"
  cactl svid revocations | grep -E "^(CRL of|[0-9]+ revoked)" | sed 's/^/    /'
  effect=
  for _ in $(seq 1 50); do
    effect=$(cactl audit list --kind svid.revoked.effective --output json | grep -o '"after_ms":[0-9]*' | tail -1) && break
    sleep 0.1
  done
  [ -n "$effect" ] || fail "the CA did not record the revocation's effect" "$logs/ca.log"
  echo "    the CA measured it: every workload stream had the CRLs ${effect#*:} ms after the command (meshid-ca audit list --kind svid.revoked)"
  if command -v openssl >/dev/null 2>&1; then
    cactl svid crl >"$dir/crl.pem"
    echo "    the CRL, as any TLS stack reads it: meshid-ca svid crl > $(show "$dir/crl.pem")"
    openssl crl -in "$dir/crl.pem" -noout -issuer -lastupdate -nextupdate | sed 's/^/    openssl crl: /'
  fi

  step "rotating the root: meshid-ca ca root prepare, status --watch, activate"
  cactl ca root prepare --reason "quickstart demo" | sed -n '1s/^/    /p'
  cactl ca root status --watch --timeout 30s | grep -E "^Agents" | tail -1 | sed 's/^/    /' ||
    fail "the agent did not deliver the new root" "$logs/agent.log"
  cactl ca root activate --reason "quickstart demo" | sed -n '1s/^/    /p'
  code=$(call "http://$web_out/hello")
  [ "$code" = 200 ] || fail "web -> api answered $code after the root activation" "$logs/api-proxy.log"
  echo "    web calls api: $code (both roots trusted until the old one is retired)"
  cactl ca root status | grep -E "^(Phase|Retire waits|Next)" | sed 's/^/    /'
  echo "    meshid-ca ca root retire succeeds once the SVIDs under the old root have expired (1 minute here)"
fi

if $once; then
  step "done (--once)"
  exit 0
fi

r() { show "$1"; }
cat <<TXT

The mesh keeps running. Try, in another terminal (from $root):

  # the two calls again, and a path the policy does not allow (403)
  curl -s http://$web_out/hello
  curl -si http://$api_out/hello
  curl -si http://$web_out/admin

  # let api call web: uncomment the api-calls-web rule at the end of $(r "$dir/policy.yaml");
  # both proxies reload it within ~200 ms, and the second curl above answers 200
  $(r "$proxy") policy check $(r "$dir/policy.yaml")
  $(r "$proxy") policy explain $(r "$dir/policy.yaml") --from spiffe://$td/api --to spiffe://$td/web --port 8080 --method GET --path /hello

  # fetch an SVID over the Workload API, as a workload (any SPIFFE client works with
  # SPIFFE_ENDPOINT_SOCKET=unix://$api_sock)
  $(r "$agent") api fetch x509 -s $(r "$api_sock")
  # watch it rotate: SVIDs live 1 minute and are renewed every 30 s
  $(r "$agent") api watch -s $(r "$api_sock")

  # the CA's web console: open http://$ca_console in a browser on this host (identities,
  # keys and rotation, the policy graph with an explain form, recent activity); its JSON:
  curl -s http://$ca_console/api/overview

  # every decision, and the metrics (decisions by rule, the proxy's SVID rotations)
  tail -f $(r "$logs")/web-access.log $(r "$logs")/api-access.log
  curl -s http://$web_proxy_ops/metrics | grep -E '^meshid_proxy_(decisions|svid)'
  curl -s http://$agent_ops/metrics | grep meshid_agent_svids
  curl -s http://$ca_ops/metrics | grep meshid_ca_svids_signed
  $(r "$ca") entry list -s $(r "$admin_sock")

Logs are in $(r "$logs")/. Press Ctrl-C to stop everything (the CA's state stays in $(r "$ca_data")).
TXT

# Until Ctrl-C or SIGTERM (the trap exits, and cleanup stops everything), or until something
# dies. A foreground sleep, not `wait`: Ctrl-C reaches every process of the group, the
# proxies, CA and agent exit cleanly on it, and bash ignores a SIGINT that a child it waits
# for handled; a sleep killed by it makes bash run the trap.
while sleep 0.5; do
  for p in "${pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      status=0
      wait "$p" || status=$?
      fail "${names[$p]} exited unexpectedly (status $status)" "${logfile[$p]}"
    fi
  done
done
exit 130 # the sleep was interrupted
