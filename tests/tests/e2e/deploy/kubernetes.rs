//! The Kubernetes manifests in `deploy/kubernetes`: parsed, cross-checked, validated against
//! the schemas, and their embedded configurations and scripts run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use super::*;

const K8S_NAMESPACE: &str = "meshid";

/// One object of a manifest.
#[derive(Clone, Debug)]
struct Obj {
    file: String,
    kind: String,
    name: String,
    v: Value,
}

impl Obj {
    fn id(&self) -> String {
        format!("{}/{} ({})", self.kind, self.name, self.file)
    }
}

/// Whether python3 with PyYAML is there (the manifests cannot be read without it).
fn have_pyyaml() -> bool {
    tool_works("python3", &["-c", "import yaml"])
}

/// Every YAML file of deploy/kubernetes, parsed: file name → documents.
fn load_k8s() -> BTreeMap<String, Vec<Value>> {
    assert!(
        have_pyyaml(),
        "python3 with PyYAML is needed to read the Kubernetes manifests: python3 -m pip install kubernetes-validate (brings PyYAML) or apt-get install python3-yaml"
    );
    let dir = deploy("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let script = "import json, sys, yaml\n\
                  out = {}\n\
                  for p in sys.argv[1:]:\n    \
                      with open(p) as f:\n        \
                          out[p] = [d for d in yaml.safe_load_all(f) if d is not None]\n\
                  json.dump(out, sys.stdout)\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    assert!(out.status.success(), "YAML parse error:\n{}", text(&out));
    let parsed: BTreeMap<String, Vec<Value>> = serde_json::from_slice(&out.stdout).unwrap();
    parsed
        .into_iter()
        .map(|(p, docs)| {
            let name = Path::new(&p)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (name, docs)
        })
        .collect()
}

fn objects(files: &BTreeMap<String, Vec<Value>>) -> Vec<Obj> {
    let mut out = Vec::new();
    for (file, docs) in files {
        if file == "kustomization.yaml" {
            continue;
        }
        for v in docs {
            out.push(Obj {
                file: file.clone(),
                kind: v["kind"].as_str().unwrap_or_default().to_owned(),
                name: v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                v: v.clone(),
            });
        }
    }
    out
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let Some(sel) = selector.as_object() else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet"];

/// Containers that run as root, and the only capabilities they may add.
const ROOT_CONTAINERS: &[(&str, &str, &[&str])] = &[
    // chown/chmod of the hostPath directories for the agent's uid.
    ("DaemonSet/meshid-agent", "prepare", &["CHOWN", "FOWNER"]),
    // iptables rules in the pod's network namespace.
    ("Deployment/web", "iptables", &["NET_ADMIN", "NET_RAW"]),
];

/// hostPath directories a pod may mount.
const HOST_PATHS: &[&str] = &["/run/meshid/agent", "/var/lib/meshid/agent"];

/// The pod template of a workload.
fn pod_spec(o: &Obj) -> &Value {
    &o.v["spec"]["template"]["spec"]
}

/// All containers of a pod spec: (is init container, container).
fn containers(pod: &Value) -> Vec<(bool, &Value)> {
    arr(&pod["initContainers"])
        .iter()
        .map(|c| (true, c))
        .chain(arr(&pod["containers"]).iter().map(|c| (false, c)))
        .collect()
}

/// The data keys of a ConfigMap or Secret.
fn data_keys(o: &Obj) -> BTreeSet<String> {
    ["data", "stringData", "binaryData"]
        .iter()
        .filter_map(|k| o.v[k].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect()
}

/// Cross-reference and policy checks that schemas cannot make. Returns the problems found.
fn check_manifests(objs: &[Obj]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut err = |e: String| errors.push(e);
    let find = |kind: &str, name: &str| objs.iter().find(|o| o.kind == kind && o.name == name);
    let mut seen = BTreeSet::new();
    let mut used_config: BTreeSet<(String, String)> = BTreeSet::new();

    for o in objs {
        if s(&o.v["apiVersion"]).is_empty() || o.kind.is_empty() || o.name.is_empty() {
            err(format!(
                "{}: apiVersion, kind and metadata.name are required",
                o.id()
            ));
        }
        if !seen.insert((o.kind.clone(), o.name.clone())) {
            err(format!("{}: defined twice", o.id()));
        }
        let ns = s(&o.v["metadata"]["namespace"]);
        if o.kind != "Namespace" && ns != K8S_NAMESPACE {
            err(format!(
                "{}: namespace {K8S_NAMESPACE:?} expected, found {ns:?}",
                o.id()
            ));
        }
        if o.kind == "ServiceAccount" && o.v["automountServiceAccountToken"] != Value::Bool(false) {
            err(format!("{}: automountServiceAccountToken: false expected (no component uses the Kubernetes API)", o.id()));
        }
    }

    for o in objs.iter().filter(|o| WORKLOADS.contains(&o.kind.as_str())) {
        let id = o.id();
        let key = format!("{}/{}", o.kind, o.name);
        let pod = pod_spec(o);
        let labels = &o.v["spec"]["template"]["metadata"]["labels"];
        if !labels_match(&o.v["spec"]["selector"]["matchLabels"], labels) {
            err(format!(
                "{id}: selector does not match the pod template's labels"
            ));
        }
        match find("ServiceAccount", s(&pod["serviceAccountName"])) {
            Some(_) => {}
            None => err(format!(
                "{id}: serviceAccountName {:?} is not defined",
                pod["serviceAccountName"]
            )),
        }
        if pod["automountServiceAccountToken"] != Value::Bool(false) {
            err(format!(
                "{id}: automountServiceAccountToken: false expected"
            ));
        }
        if pod["hostNetwork"] == Value::Bool(true) {
            err(format!("{id}: hostNetwork is not needed by any component"));
        }
        if pod["hostPID"] == Value::Bool(true) && key != "DaemonSet/meshid-agent" {
            err(format!(
                "{id}: only the agent needs hostPID (workload attestation)"
            ));
        }
        if o.kind == "StatefulSet" {
            match find("Service", s(&o.v["spec"]["serviceName"])) {
                Some(svc)
                    if s(&svc.v["spec"]["clusterIP"]) == "None"
                        && labels_match(&svc.v["spec"]["selector"], labels) => {}
                _ => err(format!(
                    "{id}: serviceName must name a headless Service selecting its pods"
                )),
            }
        }

        // Volumes, and what they refer to.
        let mut volumes = BTreeSet::new();
        for v in arr(&pod["volumes"]) {
            let name = s(&v["name"]).to_owned();
            if !volumes.insert(name.clone()) {
                err(format!("{id}: volume {name} declared twice"));
            }
            for (kind, field, src) in [
                ("ConfigMap", "name", &v["configMap"]),
                ("Secret", "secretName", &v["secret"]),
            ] {
                if src.is_null() {
                    continue;
                }
                let target = s(&src[field]);
                used_config.insert((kind.to_owned(), target.to_owned()));
                match find(kind, target) {
                    None => err(format!(
                        "{id}: volume {name}: {kind} {target:?} is not defined"
                    )),
                    Some(t) => {
                        let keys = data_keys(t);
                        for item in arr(&src["items"]) {
                            if !keys.contains(s(&item["key"])) {
                                err(format!(
                                    "{id}: volume {name}: {kind} {target} has no key {:?}",
                                    item["key"]
                                ));
                            }
                        }
                    }
                }
            }
            if let Some(path) = v["hostPath"]["path"].as_str() {
                if !HOST_PATHS.contains(&path) {
                    err(format!(
                        "{id}: hostPath {path} is not one of {HOST_PATHS:?}"
                    ));
                }
            }
        }
        for t in arr(&o.v["spec"]["volumeClaimTemplates"]) {
            volumes.insert(s(&t["metadata"]["name"]).to_owned());
        }

        let mut port_names = BTreeSet::new();
        for (init, c) in containers(pod) {
            let cname = s(&c["name"]);
            let cid = format!("{id} container {cname}");
            let sidecar = init && s(&c["restartPolicy"]) == "Always";
            if init && !c["restartPolicy"].is_null() && !sidecar {
                err(format!(
                    "{cid}: an init container's restartPolicy can only be Always"
                ));
            }
            if s(&c["image"]).is_empty() {
                err(format!("{cid}: no image"));
            }
            for part in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    if c["resources"][part][res].is_null() {
                        err(format!("{cid}: resources.{part}.{res} missing"));
                    }
                }
            }
            let sc = &c["securityContext"];
            if sc["allowPrivilegeEscalation"] != Value::Bool(false) {
                err(format!("{cid}: allowPrivilegeEscalation: false expected"));
            }
            if sc["readOnlyRootFilesystem"] != Value::Bool(true) {
                err(format!("{cid}: readOnlyRootFilesystem: true expected"));
            }
            if !arr(&sc["capabilities"]["drop"]).iter().any(|d| d == "ALL") {
                err(format!("{cid}: capabilities.drop: [ALL] expected"));
            }
            let added: Vec<&str> = arr(&sc["capabilities"]["add"]).iter().map(s).collect();
            match ROOT_CONTAINERS
                .iter()
                .find(|(w, n, _)| *w == key && *n == cname)
            {
                Some((_, _, allowed)) => {
                    if sc["runAsUser"] != 0 || sc["runAsNonRoot"] != Value::Bool(false) {
                        err(format!(
                            "{cid}: runs as root: say so (runAsUser: 0, runAsNonRoot: false)"
                        ));
                    }
                    if let Some(cap) = added.iter().find(|a| !allowed.contains(a)) {
                        err(format!("{cid}: capability {cap} beyond {allowed:?}"));
                    }
                }
                None => {
                    if sc["runAsNonRoot"] != Value::Bool(true) {
                        err(format!("{cid}: runAsNonRoot: true expected"));
                    }
                    if !added.is_empty() {
                        err(format!("{cid}: adds capabilities {added:?}"));
                    }
                }
            }
            let mut mounts = BTreeSet::new();
            for m in arr(&c["volumeMounts"]) {
                if !volumes.contains(s(&m["name"])) {
                    err(format!("{cid}: volumeMount {:?} has no volume", m["name"]));
                }
                if !mounts.insert(s(&m["mountPath"])) {
                    err(format!("{cid}: two mounts at {:?}", m["mountPath"]));
                }
            }
            for e in arr(&c["env"]) {
                for (kind, field) in [("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")]
                {
                    let r = &e["valueFrom"][field];
                    if r.is_null() {
                        continue;
                    }
                    used_config.insert((kind.to_owned(), s(&r["name"]).to_owned()));
                    match find(kind, s(&r["name"])) {
                        Some(t) if data_keys(t).contains(s(&r["key"])) => {}
                        _ => err(format!(
                            "{cid}: env {:?}: {kind} key {r} is not defined",
                            e["name"]
                        )),
                    }
                }
            }
            let ports: Vec<&Value> = arr(&c["ports"]).iter().collect();
            for p in &ports {
                if let Some(n) = p["name"].as_str() {
                    if !port_names.insert(n.to_owned()) {
                        err(format!("{cid}: port name {n} used twice in the pod"));
                    }
                }
            }
            let probes = ["startupProbe", "livenessProbe", "readinessProbe"];
            if init && !sidecar {
                if probes.iter().any(|p| !c[p].is_null()) {
                    err(format!("{cid}: init containers cannot have probes"));
                }
                continue;
            }
            for p in ["livenessProbe", "readinessProbe"] {
                if c[p].is_null() {
                    err(format!("{cid}: {p} missing"));
                }
            }
            for p in probes {
                let probe = &c[p];
                if probe.is_null() {
                    continue;
                }
                let port = if !probe["httpGet"].is_null() {
                    Some(&probe["httpGet"]["port"])
                } else if !probe["tcpSocket"].is_null() {
                    Some(&probe["tcpSocket"]["port"])
                } else if arr(&probe["exec"]["command"]).is_empty() {
                    err(format!("{cid}: {p} has no handler"));
                    None
                } else {
                    None
                };
                if let Some(port) = port {
                    let declared = ports.iter().any(|cp| match port {
                        Value::String(n) => cp["name"] == *n,
                        n => cp["containerPort"] == *n,
                    });
                    if !declared {
                        err(format!(
                            "{cid}: {p} port {port} is not a port of this container"
                        ));
                    }
                }
            }
        }
    }

    // Services select pods, and their target ports exist there.
    for svc in objs.iter().filter(|o| o.kind == "Service") {
        let selector = &svc.v["spec"]["selector"];
        let pods: Vec<&Obj> = objs
            .iter()
            .filter(|o| WORKLOADS.contains(&o.kind.as_str()))
            .filter(|o| labels_match(selector, &o.v["spec"]["template"]["metadata"]["labels"]))
            .collect();
        if pods.is_empty() {
            err(format!(
                "{}: selector {selector} matches no pod template",
                svc.id()
            ));
        }
        for p in arr(&svc.v["spec"]["ports"]) {
            let target = if p["targetPort"].is_null() {
                &p["port"]
            } else {
                &p["targetPort"]
            };
            for w in &pods {
                let found = containers(pod_spec(w)).iter().any(|(_, c)| {
                    arr(&c["ports"]).iter().any(|cp| match target {
                        Value::String(n) => cp["name"] == *n,
                        n => cp["containerPort"] == *n,
                    })
                });
                if !found {
                    err(format!(
                        "{}: targetPort {target} is not a port of {}",
                        svc.id(),
                        w.id()
                    ));
                }
            }
        }
    }
    for o in objs
        .iter()
        .filter(|o| o.kind == "PodDisruptionBudget" || o.kind == "NetworkPolicy")
    {
        let sel = if o.kind == "NetworkPolicy" {
            &o.v["spec"]["podSelector"]["matchLabels"]
        } else {
            &o.v["spec"]["selector"]["matchLabels"]
        };
        let any = objs
            .iter()
            .filter(|w| WORKLOADS.contains(&w.kind.as_str()))
            .any(|w| labels_match(sel, &w.v["spec"]["template"]["metadata"]["labels"]));
        if !any {
            err(format!("{}: selector matches no pod template", o.id()));
        }
        for rule in arr(&o.v["spec"]["ingress"]) {
            for from in arr(&rule["from"]) {
                let sel = &from["podSelector"]["matchLabels"];
                if !sel.is_null()
                    && !objs
                        .iter()
                        .filter(|w| WORKLOADS.contains(&w.kind.as_str()))
                        .any(|w| labels_match(sel, &w.v["spec"]["template"]["metadata"]["labels"]))
                {
                    err(format!(
                        "{}: ingress podSelector {sel} matches no pod template",
                        o.id()
                    ));
                }
            }
        }
    }
    // Nothing defined for nobody.
    for o in objs
        .iter()
        .filter(|o| o.kind == "ConfigMap" || o.kind == "Secret")
    {
        if !used_config.contains(&(o.kind.clone(), o.name.clone())) {
            err(format!("{}: not used by any pod", o.id()));
        }
    }
    errors
}

/// The one object of `kind` named `name`.
fn get<'a>(objs: &'a [Obj], kind: &str, name: &str) -> &'a Obj {
    objs.iter()
        .find(|o| o.kind == kind && o.name == name)
        .unwrap_or_else(|| panic!("{kind}/{name} is not defined"))
}

/// The container (or init container) `name` of a workload.
fn container<'a>(o: &'a Obj, name: &str) -> &'a Value {
    containers(pod_spec(o))
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{} has no container {name}", o.id()))
}

/// The file `key` of ConfigMap `name`.
fn config_file(objs: &[Obj], name: &str, key: &str) -> String {
    s(&get(objs, "ConfigMap", name).v["data"][key]).to_owned()
}

/// Whether `path` is one of the container's mounts or lies in one.
fn mounted(c: &Value, path: &str) -> bool {
    arr(&c["volumeMounts"]).iter().any(|m| {
        let dir = s(&m["mountPath"]).trim_end_matches('/');
        path.strip_prefix(dir)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The containerPort named `name` of container `c`.
fn container_port(c: &Value, name: &str) -> Option<u16> {
    arr(&c["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .map(|p| p as u16)
}

/// The volume of a pod that container `c` mounts at `mount_path`.
fn volume_at<'a>(o: &'a Obj, c: &Value, mount_path: &str) -> &'a Value {
    let name = arr(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .map(|m| s(&m["name"]).to_owned())
        .unwrap_or_else(|| panic!("{}: nothing mounted at {mount_path}", o.id()));
    arr(&pod_spec(o)["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap()
}

/// The command line of a container, command then args.
fn argv(c: &Value) -> Vec<String> {
    arr(&c["command"])
        .iter()
        .chain(arr(&c["args"]))
        .map(|v| s(v).to_owned())
        .collect()
}

/// The value after `flag` in `argv`.
fn flag<'a>(argv: &'a [String], name: &str) -> Option<&'a str> {
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .map(String::as_str)
}

/// Checks that the embedded configurations agree with the pods that use them: paths inside
/// mounts, listener ports declared, uids consistent with the iptables rules.
fn check_wiring(objs: &[Obj]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            errors.push(what);
        }
    };

    let ca = get(objs, "StatefulSet", "meshid-ca");
    let ca_c = container(ca, "ca");
    let ca_toml = config_file(objs, "meshid-ca-config", "ca.toml");
    let ca_argv = argv(ca_c);
    let ca_config = flag(&ca_argv, "--config").unwrap_or_default();
    expect(
        mounted(ca_c, ca_config),
        format!("ca: --config {ca_config} is not mounted"),
    );
    for key in ["data_dir", "admin_socket"] {
        let p = toml_get(&ca_toml, "", key).unwrap();
        expect(
            mounted(ca_c, &p),
            format!("ca.toml {key} {p} is not on a volume of the ca container"),
        );
    }
    for key in ["upstream_cert", "upstream_key"] {
        let p = toml_get(&ca_toml, "ca", key).unwrap();
        expect(
            mounted(ca_c, &p),
            format!("ca.toml ca.{key} {p} is not mounted in the ca container"),
        );
    }
    let data_dir = toml_get(&ca_toml, "", "data_dir").unwrap();
    expect(
        !arr(&ca_c["volumeMounts"]).iter().any(|m| m["mountPath"] == data_dir.as_str()),
        format!("ca.toml data_dir {data_dir} must be a subdirectory of the volume (meshid-ca sets its mode)"),
    );
    for (key, port) in [("ops_address", "ops"), ("node_address", "node")] {
        let addr = toml_get(&ca_toml, "", key).unwrap();
        expect(
            addr.starts_with("0.0.0.0:"),
            format!("ca.toml {key} {addr} must listen on the pod IP"),
        );
        expect(
            container_port(ca_c, port) == Some(port_of(&addr)),
            format!("ca.toml {key} {addr} is not containerPort {port}"),
        );
    }
    let pgpass = arr(&ca_c["env"])
        .iter()
        .find(|e| e["name"] == "PGPASSFILE")
        .map(|e| s(&e["value"]).to_owned())
        .unwrap_or_default();
    expect(
        mounted(ca_c, &pgpass),
        format!("ca: PGPASSFILE {pgpass:?} is not mounted"),
    );
    let datastore = toml_get(&ca_toml, "", "datastore").unwrap();
    let userinfo = datastore
        .split_once("://")
        .map_or("", |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("")
        .rsplit_once('@')
        .map_or("", |(user, _)| user);
    expect(
        !userinfo.contains(':'),
        "ca.toml datastore must not carry a password (it comes from PGPASSFILE)".to_owned(),
    );
    let replicas = ca.v["spec"]["replicas"].as_u64().unwrap_or(0);
    expect(
        replicas >= 2,
        format!("meshid-ca replicas {replicas}: 2 or more expected"),
    );

    let agent = get(objs, "DaemonSet", "meshid-agent");
    let agent_c = container(agent, "agent");
    let agent_toml = config_file(objs, "meshid-agent-config", "agent.toml");
    let agent_argv = argv(agent_c);
    let agent_config = flag(&agent_argv, "--config").unwrap_or_default();
    expect(
        mounted(agent_c, agent_config),
        format!("agent: --config {agent_config} is not mounted"),
    );
    for key in [
        "trust_bundle_path",
        "data_dir",
        "socket_path",
        "join_token_file",
    ] {
        let p = toml_get(&agent_toml, "", key).unwrap();
        expect(
            mounted(agent_c, &p),
            format!("agent.toml {key} {p} is not mounted in the agent container"),
        );
    }
    let socket = toml_get(&agent_toml, "", "socket_path").unwrap();
    let socket_dir = Path::new(&socket)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let agent_socket_vol = volume_at(agent, agent_c, &socket_dir);
    expect(
        agent_socket_vol["hostPath"]["path"] == socket_dir.as_str()
            && agent_socket_vol["hostPath"]["type"] == "DirectoryOrCreate",
        format!(
            "agent: {socket_dir} must be the node's {socket_dir} (hostPath, DirectoryOrCreate)"
        ),
    );
    let ops = toml_get(&agent_toml, "", "ops_address").unwrap();
    expect(
        container_port(agent_c, "ops") == Some(port_of(&ops)),
        format!("agent.toml ops_address {ops} is not containerPort ops"),
    );
    let server = toml_get(&agent_toml, "", "server_address").unwrap();
    let node_svc = get(objs, "Service", server.split(':').next().unwrap());
    expect(
        arr(&node_svc.v["spec"]["ports"])
            .iter()
            .any(|p| p["port"] == port_of(&server)),
        format!("agent.toml server_address {server}: no such Service port"),
    );
    expect(
        agent_toml.contains("meshid-ca-0.meshid-ca:8443")
            && agent_toml.contains("meshid-ca-1.meshid-ca:8443"),
        "agent.toml extra_server_addresses: each CA server by its stable name".to_owned(),
    );
    expect(
        pod_spec(agent)["hostPID"] == Value::Bool(true),
        "agent: hostPID is needed for attestation".to_owned(),
    );

    let web = get(objs, "Deployment", "web");
    let proxy_c = container(web, "proxy");
    let app_c = container(web, "app");
    let iptables_c = container(web, "iptables");
    let proxy_toml = config_file(objs, "meshid-proxy-web", "proxy.toml");
    let proxy_argv = argv(proxy_c);
    let proxy_config = flag(&proxy_argv, "--config").unwrap_or_default();
    expect(
        mounted(proxy_c, proxy_config),
        format!("proxy: --config {proxy_config} is not mounted"),
    );
    let ipt = argv(iptables_c);
    expect(
        ipt.get(1..3) == Some(&["iptables".to_owned(), "install".to_owned()][..])
            && flag(&ipt, "--config") == Some(proxy_config)
            && mounted(iptables_c, proxy_config),
        format!("iptables init container: meshid-proxy iptables install --config {proxy_config} expected, found {ipt:?}"),
    );
    let proxy_uid = proxy_c["securityContext"]["runAsUser"].as_u64();
    expect(
        flag(&ipt, "--proxy-uid").and_then(|u| u.parse().ok()) == proxy_uid,
        format!(
            "iptables --proxy-uid must be the proxy container's runAsUser {proxy_uid:?}: {ipt:?}"
        ),
    );
    expect(
        app_c["securityContext"]["runAsUser"].as_u64() != proxy_uid,
        "the app must not run as the proxy's uid (its traffic would bypass the proxy)".to_owned(),
    );
    let app_port = container_port(app_c, "http").unwrap_or(0);
    let inbound: Vec<&str> = flag(&ipt, "--inbound-ports")
        .unwrap_or_default()
        .split(',')
        .collect();
    expect(
        inbound.contains(&app_port.to_string().as_str()),
        format!("iptables --inbound-ports {inbound:?} must capture the app's port {app_port}"),
    );
    let ops = toml_get(&proxy_toml, "", "ops_address").unwrap();
    expect(
        ops.starts_with("0.0.0.0:") && container_port(proxy_c, "proxy-ops") == Some(port_of(&ops)),
        format!("proxy.toml ops_address {ops} must be on the pod IP as containerPort proxy-ops (kubelet's probes)"),
    );
    expect(
        !inbound.contains(&port_of(&ops).to_string().as_str()),
        "the proxy's ops port must not be captured (kubelet's probes)".to_owned(),
    );
    let inbound_listen = toml_get(&proxy_toml, "transparent", "inbound_listen").unwrap();
    expect(
        container_port(proxy_c, "mesh-inbound") == Some(port_of(&inbound_listen)),
        format!("proxy.toml transparent.inbound_listen {inbound_listen} is not containerPort mesh-inbound"),
    );
    let policy = toml_get(&proxy_toml, "", "policy_file").unwrap();
    expect(
        mounted(proxy_c, &policy),
        format!("proxy.toml policy_file {policy} is not mounted"),
    );
    let policy_dir = Path::new(&policy).parent().unwrap().to_str().unwrap();
    expect(
        volume_at(web, proxy_c, policy_dir)["configMap"]["name"] == "meshid-policy"
            && !arr(&proxy_c["volumeMounts"])
                .iter()
                .any(|m| !m["subPath"].is_null()),
        "the policy ConfigMap must be mounted as a directory (subPath mounts never see updates)"
            .to_owned(),
    );
    let api = toml_get(&proxy_toml, "", "workload_api_socket").unwrap();
    let api_path = api.strip_prefix("unix://").unwrap_or(&api);
    expect(
        mounted(proxy_c, api_path),
        format!("proxy.toml workload_api_socket {api} is not mounted"),
    );
    let api_dir = Path::new(api_path).parent().unwrap().to_str().unwrap();
    let web_socket_vol = volume_at(web, proxy_c, api_dir);
    expect(
        web_socket_vol["hostPath"]["path"] == agent_socket_vol["hostPath"]["path"]
            && web_socket_vol["hostPath"]["type"] == "Directory",
        "the proxy must mount the agent's socket directory (hostPath, type Directory)".to_owned(),
    );
    expect(
        !mounted(app_c, api_path),
        "the app does not need the Workload API (the proxy holds the SVID)".to_owned(),
    );
    errors
}

/// A named change that makes the manifests wrong.
type Breakage = (&'static str, fn(&mut [Obj]));

#[test]
fn kubernetes_manifests_are_consistent_and_valid() {
    let files = load_k8s();
    let objs = objects(&files);

    // kustomization.yaml lists every manifest but the operator's examples.
    let kust = &files["kustomization.yaml"][0];
    assert_eq!(kust["namespace"], K8S_NAMESPACE);
    let listed: BTreeSet<String> = arr(&kust["resources"])
        .iter()
        .map(|r| s(r).to_owned())
        .collect();
    let on_disk: BTreeSet<String> = files
        .keys()
        .filter(|f| *f != "kustomization.yaml" && !f.ends_with(".example.yaml"))
        .cloned()
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml resources vs. the files in deploy/kubernetes"
    );
    let images: BTreeSet<&str> = objs
        .iter()
        .filter(|o| WORKLOADS.contains(&o.kind.as_str()))
        .flat_map(|o| {
            containers(pod_spec(o))
                .into_iter()
                .map(|(_, c)| s(&c["image"]))
        })
        .collect();
    for i in arr(&kust["images"]) {
        let name = s(&i["name"]);
        assert!(
            images.iter().any(|img| img.split(':').next() == Some(name)),
            "kustomization.yaml images: {name} is used by no container"
        );
    }
    for kind in [
        "Namespace",
        "StatefulSet",
        "DaemonSet",
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
    ] {
        assert!(
            objs.iter().any(|o| o.kind == kind),
            "no {kind} in the manifests"
        );
    }

    let mut errors = check_manifests(&objs);
    errors.extend(check_wiring(&objs));
    assert!(
        errors.is_empty(),
        "deploy/kubernetes:\n{}",
        errors.join("\n")
    );

    // The cross-reference check is not vacuous: breaking a manifest is noticed.
    let breakages: Vec<Breakage> = vec![
        (
            "a ConfigMap volume naming an undefined ConfigMap",
            |objs: &mut [Obj]| {
                let o = objs.iter_mut().find(|o| o.kind == "DaemonSet").unwrap();
                o.v["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] =
                    Value::from("meshid-agent-confg");
            },
        ),
        (
            "a container without readinessProbe",
            |objs: &mut [Obj]| {
                let o = objs
                    .iter_mut()
                    .find(|o| o.name == "meshid-ca" && o.kind == "StatefulSet")
                    .unwrap();
                o.v["spec"]["template"]["spec"]["containers"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("readinessProbe");
            },
        ),
        ("a Service selecting no pod", |objs: &mut [Obj]| {
            let o = objs
                .iter_mut()
                .find(|o| o.kind == "Service" && o.name == "web")
                .unwrap();
            o.v["spec"]["selector"]["app.kubernetes.io/name"] = Value::from("wbe");
        }),
        ("a probe on an undeclared port", |objs: &mut [Obj]| {
            let o = objs.iter_mut().find(|o| o.kind == "DaemonSet").unwrap();
            o.v["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] =
                Value::from("health");
        }),
        ("a writable root file system", |objs: &mut [Obj]| {
            let o = objs.iter_mut().find(|o| o.kind == "Deployment").unwrap();
            o.v["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                ["readOnlyRootFilesystem"] = Value::Bool(false);
        }),
    ];
    for (what, breakage) in &breakages {
        let mut broken = objs.clone();
        breakage(&mut broken);
        let mut found = check_manifests(&broken);
        found.extend(check_wiring(&broken));
        assert!(!found.is_empty(), "the check did not notice {what}");
    }
    println!(
        "cross-reference check: {} objects in {} files OK ({} deliberate breakages noticed)",
        objs.len(),
        files.len(),
        breakages.len()
    );

    schema_validation(&files);

    if tool_works("kubectl", &["version", "--client"]) {
        let out = Command::new("kubectl")
            .args(["kustomize"])
            .arg(deploy("kubernetes"))
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl kustomize: {}", text(&out));
        println!("kubectl kustomize deploy/kubernetes: OK");
    } else {
        println!("SKIPPED kubectl kustomize: kubectl is not installed");
    }
}

/// The Kubernetes versions the manifests are validated against: the first with native sidecar
/// containers on by default, and the newest the validator knows.
const K8S_VERSIONS: &[&str] = &["1.29.0", "latest"];

fn schema_validation(files: &BTreeMap<String, Vec<Value>>) {
    let dir = deploy("kubernetes");
    if !tool_works("python3", &["-c", "import kubernetes_validate"]) {
        let msg = "schema validation SKIPPED: kubernetes-validate is not installed (python3 -m pip install kubernetes-validate==1.37.0); only the cross-reference check ran";
        assert!(
            std::env::var_os("MESHID_CI").is_none(),
            "{msg}; CI must run the schema validation"
        );
        println!("{msg}");
        return;
    }
    let manifests: Vec<PathBuf> = files
        .keys()
        .filter(|f| *f != "kustomization.yaml")
        .map(|f| dir.join(f))
        .collect();
    let validate = |paths: &[PathBuf], version: &str| {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "kubernetes_validate", "--strict", "--quiet"]);
        if version != "latest" {
            cmd.args(["-k", version]);
        }
        cmd.args(paths).output().unwrap()
    };
    for version in K8S_VERSIONS {
        let out = validate(&manifests, version);
        assert!(
            out.status.success(),
            "kubernetes-validate --strict (Kubernetes {version}):\n{}",
            text(&out)
        );
    }
    // The validator is strict here: an unknown field fails.
    let scratch = tempfile::tempdir().unwrap();
    let bad = scratch.path().join("bad.yaml");
    std::fs::write(
        &bad,
        read(&dir.join("agent.yaml")).replacen(
            "readOnlyRootFilesystem:",
            "readOnlyRootFilesytem:",
            1,
        ),
    )
    .unwrap();
    let out = validate(&[bad], K8S_VERSIONS[0]);
    assert!(
        !out.status.success(),
        "kubernetes-validate --strict accepted an unknown field:\n{}",
        text(&out)
    );
    let version = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!(
        "schema validation: kubernetes-validate {version} --strict, Kubernetes {}: {} files OK",
        K8S_VERSIONS.join(" and "),
        manifests.len()
    );
}

/// Runs an init container's shell script with its absolute paths moved under `root`.
fn run_script(script: &str, root: &Path, env: &[(&str, &str)], moves: &[&str]) -> Output {
    let mut script = script.replace(
        "/usr/local/bin/",
        &format!("{}/", meshid_tests::bin_dir().display()),
    );
    for m in moves {
        script = script.replace(m, &format!("{}{m}", root.display()));
    }
    Command::new("sh")
        .arg("-c")
        .arg(&script)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn kubernetes_configs_pass_check() {
    let files = load_k8s();
    let objs = objects(&files);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };

    let ca_path = write(
        "ca.toml",
        &config_file(&objs, "meshid-ca-config", "ca.toml"),
    );
    let (code, out) = run(
        "meshid-ca",
        &["run", "--config", ca_path.to_str().unwrap(), "--check"],
    );
    assert_eq!(code, 0, "meshid-ca-config ca.toml: {out}");
    let agent_path = write(
        "agent.toml",
        &config_file(&objs, "meshid-agent-config", "agent.toml"),
    );
    let (code, out) = run(
        "meshid-agent",
        &["run", "--config", agent_path.to_str().unwrap(), "--check"],
    );
    assert_eq!(code, 0, "meshid-agent-config agent.toml: {out}");
    let policy_path = write(
        "policy.yaml",
        &config_file(&objs, "meshid-policy", "policy.yaml"),
    );
    let (code, out) = run(
        "meshid-proxy",
        &["policy", "check", policy_path.to_str().unwrap()],
    );
    assert_eq!(
        code, 0,
        "meshid-policy policy.yaml (0 = no warnings): {out}"
    );
    let (code, out) = check_proxy_config(
        dir.path(),
        &config_file(&objs, "meshid-proxy-web", "proxy.toml"),
        &policy_path,
    );
    assert_eq!(code, 0, "meshid-proxy-web proxy.toml: {out}");

    // The CA's init container: the key and the libpq password file private (mode 0600), and
    // ca.toml with this pod's name as --server-id passes --check. The server itself is named
    // the same way: --server-id $(POD_NAME), the pod's name from the downward API.
    let ca = get(&objs, "StatefulSet", "meshid-ca");
    let ca_container = container(ca, "ca");
    let ca_argv = argv(ca_container);
    let at = ca_argv
        .iter()
        .position(|a| a == "--server-id")
        .expect("the ca container passes --server-id");
    assert_eq!(ca_argv[at + 1], "$(POD_NAME)");
    assert_eq!(
        ca_container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "POD_NAME")
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone()),
        Some(Value::from("metadata.name"))
    );
    let prepare = argv(container(ca, "prepare"));
    assert_eq!(prepare[..2], ["/bin/sh", "-c"]);
    let root = dir.path().join("ca-root");
    for (d, f, body) in [
        (
            "etc/meshid/ca",
            "ca.toml",
            config_file(&objs, "meshid-ca-config", "ca.toml"),
        ),
        (
            "etc/meshid/upstream",
            "tls.key",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_owned(),
        ),
        ("etc/meshid/postgres", "password", "pa:ss\\word".to_owned()),
        ("run/meshid-ca", ".keep", String::new()),
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
        std::fs::write(root.join(d).join(f), body).unwrap();
        std::fs::set_permissions(root.join(d).join(f), std::fs::Permissions::from_mode(0o440))
            .unwrap();
    }
    let out = run_script(
        &prepare[2],
        &root,
        &[("POD_NAME", "meshid-ca-1")],
        &["/etc/meshid/", "/run/meshid-ca/"],
    );
    assert!(
        out.status.success(),
        "the CA's init script failed:\n{}",
        text(&out)
    );
    let prepared = root.join("run/meshid-ca");
    assert_eq!(read(&prepared.join("pgpass")), "*:*:*:*:pa:ss\\word\n");
    for f in ["pgpass", "upstream.key"] {
        assert_eq!(mode(&prepared.join(f)), 0o600, "{f}");
    }
    assert_eq!(
        read(&prepared.join("upstream.key")),
        read(&root.join("etc/meshid/upstream/tls.key"))
    );

    // The agent's init container: the directories handed to the agent's uid, this node's
    // token copied, or an empty file when there is none.
    if !is_root() {
        println!("SKIPPED the agent's init script: it chowns, which needs root");
    } else {
        let agent = get(&objs, "DaemonSet", "meshid-agent");
        let prepare = argv(container(agent, "prepare"));
        let agent_uid = container(agent, "agent")["securityContext"]["runAsUser"]
            .as_u64()
            .unwrap() as u32;
        let root = dir.path().join("agent-root");
        for d in [
            "run/meshid/agent",
            "var/lib/meshid/agent",
            "etc/meshid/join-tokens",
            "run/meshid-agent",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("etc/meshid/join-tokens/node-1"), "TOKEN-1\n").unwrap();
        let moves = [
            "/run/meshid/agent",
            "/var/lib/meshid/agent",
            "/etc/meshid/join-tokens",
            "/run/meshid-agent",
        ];
        for (node, token) in [("node-1", "TOKEN-1\n"), ("node-2", "")] {
            let out = run_script(&prepare[2], &root, &[("NODE_NAME", node)], &moves);
            assert!(
                out.status.success(),
                "the agent's init script failed:\n{}",
                text(&out)
            );
            let file = root.join("run/meshid-agent/join-token");
            assert_eq!(read(&file), token, "{node}");
            assert_eq!(mode(&file), 0o600);
            assert_eq!(std::fs::metadata(&file).unwrap().uid(), agent_uid);
        }
        assert_eq!(mode(&root.join("run/meshid/agent")), 0o755);
        assert_eq!(mode(&root.join("var/lib/meshid/agent")), 0o700);
        for d in ["run/meshid/agent", "var/lib/meshid/agent"] {
            assert_eq!(
                std::fs::metadata(root.join(d)).unwrap().uid(),
                agent_uid,
                "{d}"
            );
        }
    }
    println!("ConfigMap configurations pass --check; init scripts behave");
}
