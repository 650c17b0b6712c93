// grpc-js (npm @grpc/grpc-js: Node's HTTP/2, nghttp2, and its own gRPC) against meshid's Unix
// sockets, run by tests/tests/e2e/interop.rs. One line per check, `ok NAME` or `FAIL NAME: DETAIL`;
// exit 1 if any failed.
//
//   node grpc_js.js SOCKET agent PROTO   the Workload API with each :authority form
//   node grpc_js.js SOCKET admin         the CA's admin API with each :authority form
"use strict";

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const { version } = require("@grpc/grpc-js/package.json");

const [socket, kind, proto] = process.argv.slice(2);
let failed = 0;
let passed = 0;

function report(name, err) {
  if (err) {
    failed += 1;
    console.log(`FAIL ${name}: ${String(err && err.message ? err.message : err).replace(/\n/g, " | ")}`);
  } else {
    passed += 1;
    console.log(`ok ${name}`);
  }
}

function withDeadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

// grpc-js sends `localhost` on a Unix socket by default; grpc-java sends the raw path and
// gRPC C-core the percent-encoded one: `grpc.default_authority` reproduces each.
const forms = {
  "grpc-js's default": undefined,
  "the raw socket path (as grpc-java)": socket,
  "the percent-encoded socket path (as gRPC C-core)": socket.split("/").join("%2F"),
};

function agentChecks(options) {
  const def = protoLoader.loadSync(proto, { keepCase: true, longs: String, defaults: true });
  const pkg = grpc.loadPackageDefinition(def);
  const client = new pkg.SpiffeWorkloadAPI(`unix:${socket}`, grpc.credentials.createInsecure(), options);
  const md = new grpc.Metadata();
  md.set("workload.spiffe.io", "true");
  const x509 = new Promise((resolve, reject) => {
    const call = client.FetchX509SVID({}, md, { deadline: withDeadline(15) });
    call.on("data", (resp) => {
      call.cancel();
      if (resp.svids.length >= 1 && resp.svids[0].spiffe_id.startsWith("spiffe://")) resolve();
      else reject(new Error(`unexpected response ${JSON.stringify(resp.svids.map((s) => s.spiffe_id))}`));
    });
    call.on("error", (e) => {
      if (e.code !== grpc.status.CANCELLED) reject(e);
    });
  });
  const jwt = new Promise((resolve, reject) => {
    client.FetchJWTSVID({ audience: ["billing"] }, md, { deadline: withDeadline(15) }, (e, resp) => {
      if (e) return reject(e);
      if (resp.svids.length >= 1 && resp.svids[0].svid.split(".").length === 3) return resolve();
      return reject(new Error("no JWT-SVID"));
    });
  });
  const noHeader = new Promise((resolve, reject) => {
    client.FetchJWTSVID({ audience: ["billing"] }, new grpc.Metadata(), { deadline: withDeadline(15) }, (e) => {
      if (e && e.code === grpc.status.INVALID_ARGUMENT) return resolve();
      return reject(new Error(`expected InvalidArgument, got ${e ? e.code : "success"}`));
    });
  });
  return Promise.all([x509, jwt, noHeader]).finally(() => client.close());
}

function adminChecks(options) {
  const client = new grpc.Client(`unix:${socket}`, grpc.credentials.createInsecure(), options);
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(
      "/meshid.admin.v1.Authority/Status",
      (x) => x,
      (b) => b,
      Buffer.alloc(0),
      new grpc.Metadata(),
      { deadline: withDeadline(15) },
      (e, resp) => {
        client.close();
        if (e) return reject(e);
        if (resp.length > 0) return resolve();
        return reject(new Error("empty status"));
      },
    );
  });
}

async function main() {
  for (const [form, authority] of Object.entries(forms)) {
    const options = authority === undefined ? {} : { "grpc.default_authority": authority };
    const name = `grpc-js ${version}, ${kind} socket, :authority = ${form}`;
    try {
      await (kind === "agent" ? agentChecks(options) : adminChecks(options));
      report(name);
    } catch (e) {
      report(name, e);
    }
  }
  process.exit(failed === 0 && passed > 0 ? 0 : 1);
}

main();
