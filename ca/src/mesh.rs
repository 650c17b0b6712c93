//! Mesh files (`meshid-ca apply -f`): the registration entries and named policy documents that
//! one owner declares, in YAML, for the CA to converge to.
//!
//! ```yaml
//! owner: payments                  # required: the label stamped on everything applied
//! entries:
//!   - spiffe_id: spiffe://example.org/payments/web
//!     parent_id: spiffe://example.org/meshid/agent/join_token/3f2a
//!     selectors: [unix:uid:1000]
//!     x509_svid_ttl: 300           # optional: seconds, or a duration such as 5m
//!     jwt_svid_ttl: 5m             # optional
//!     dns_names: [web.payments.internal]
//!     federates_with: [partner.org]
//!     hint: web
//!     admin: false
//! policies:
//!   - name: payments
//!     file: policies/payments.yaml # relative to this file
//!   - name: payments-batch
//!     inline: |                    # or the document itself, as a literal block
//!       default: deny
//!       rules: []
//! federations:
//!   - trust_domain: partner.org
//!     endpoint_url: https://ca.partner.org:8443
//!     profile: https_spiffe        # or https_web (then no endpoint_spiffe_id)
//!     endpoint_spiffe_id: spiffe://partner.org/meshid/server
//!     bundle_file: bundles/partner.json  # the bundle a new relationship starts from
//! ```
//!
//! A directory stands for every `*.yaml` and `*.yml` file directly in it (not in its
//! subdirectories, so policy files can live in one), in name order, combined; each declares
//! the same owner. An entry is identified by its SPIFFE ID, parent ID and selectors (in any
//! order), a policy document by its name: declaring one twice is refused, naming both places.
//!
//! Reading is strict, and every error carries file:line:column: unknown keys, wrong types,
//! anchors, aliases, tags and duplicate keys are refused. A mesh file is meant for version
//! control, so it never holds a secret: there is no field for one, and a key named like one or
//! a value that looks like one (a PEM private key, a JWT, a join token) is refused rather than
//! ignored, in the policy documents it names too. What can be checked without the CA is checked
//! here, at the value (SPIFFE ID syntax, selectors, DNS names, TTL ranges, names); the CA
//! checks the rest (its trust domain, reserved paths, the policy documents) when it applies the
//! file, with the entry's or the document's position.
//!
//! It is pure but for reading the files in [`load`]; [`parse`] reads one text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use meshid_policy::yaml::{self, clip, scalar_text, Fields, Node, Pos, ScalarStyle, Value};
use meshid_policy::PolicyError;

use crate::entry::{self, EntrySpec, Selector};

/// The largest mesh file read, in bytes.
pub const MAX_MESH_BYTES: usize = 4 << 20;
/// The largest apply request and plan carried between `meshid-ca apply` and the CA (gRPC's
/// default of 4 MiB is too small for a first import of thousands of entries).
pub const MAX_MESH_MESSAGE: usize = 64 << 20;
/// Most files read from a directory.
pub const MAX_MESH_FILES: usize = 256;
/// Most entries one owner may declare.
pub const MAX_MESH_ENTRIES: usize = 10_000;

/// Why a mesh file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// A file or directory could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A directory or file is unusable as a whole (no mesh file in a directory, too large).
    #[error("{}: {message}", path.display())]
    Unusable {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// The text is not well-formed YAML, or breaks a rule of mesh files.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        /// The file name used in messages.
        origin: String,
        /// Line, from 1.
        line: usize,
        /// Column in characters, from 1.
        column: usize,
        /// What is wrong and what to do.
        message: String,
    },
}

/// One mesh file as written: policy documents named by `file:` and bundles named by
/// `bundle_file:` are not read yet ([`load`] reads them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshFile {
    /// The owner label.
    pub owner: String,
    /// The entries, in file order.
    pub entries: Vec<DeclaredEntry>,
    /// The policy documents, in file order.
    pub policies: Vec<DeclaredPolicy>,
    /// The federation relationships, in file order.
    pub federations: Vec<DeclaredFederation>,
}

/// A federation relationship as declared (checked as a relationship by the CA, which knows its
/// own trust domain).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeclaredFederation {
    /// `file:line:column` of the declaration.
    pub at: String,
    /// The other trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint.
    pub endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// For https_spiffe: the ID the endpoint presents.
    pub endpoint_spiffe_id: String,
    /// The bundle a new relationship starts from: as written in the file (relative to it), then
    /// (after [`load`]) its text.
    pub bundle: FederationBundle,
}

/// Where a declared relationship's bootstrap bundle is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FederationBundle {
    /// None given.
    #[default]
    None,
    /// A file, as written.
    File(PathBuf),
    /// The document, read.
    Text(String),
}

/// An entry and where it is declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredEntry {
    /// `file:line:column` of the entry's mapping.
    pub at: String,
    /// What the file asks for (no id: entries are matched by identity).
    pub spec: EntrySpec,
}

impl DeclaredEntry {
    /// What identifies the entry: SPIFFE ID, parent ID and the sorted selectors.
    pub fn identity(&self) -> (String, String, Vec<String>) {
        identity(&self.spec)
    }
}

/// What identifies an entry of a mesh: SPIFFE ID, parent ID and the sorted, deduplicated
/// selectors (as text).
pub fn identity(spec: &EntrySpec) -> (String, String, Vec<String>) {
    let mut selectors = spec.selectors.clone();
    selectors.sort();
    selectors.dedup();
    (spec.spiffe_id.clone(), spec.parent_id.clone(), selectors)
}

/// A policy document as declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredPolicy {
    /// The document's name.
    pub name: String,
    /// `file:line:column` of the declaration.
    pub at: String,
    /// Where its text is.
    pub source: PolicySource,
}

/// Where a declared policy document's text is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// A file of its own, as written (relative paths are relative to the mesh file).
    File(PathBuf),
    /// The text, written in the mesh file as a literal block.
    Inline {
        /// The document.
        text: String,
        /// The line before its first line in the mesh file.
        line_offset: usize,
        /// Its indentation in the mesh file (columns before its first column).
        column_offset: usize,
    },
}

/// A mesh file or directory with its policy documents read: what `meshid-ca apply` sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// The owner label.
    pub owner: String,
    /// The entries, in file order (files in name order).
    pub entries: Vec<DeclaredEntry>,
    /// The policy documents, in file order.
    pub policies: Vec<LoadedPolicy>,
    /// The federation relationships, with their bootstrap bundles read.
    pub federations: Vec<DeclaredFederation>,
    /// The mesh files read.
    pub files: Vec<PathBuf>,
}

/// A policy document with its text: what the CA applies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadedPolicy {
    /// The document's name.
    pub name: String,
    /// meshid-policy YAML.
    pub text: String,
    /// The file the text is in.
    pub origin: String,
    /// Added to the line of a position in `text` to give the line in `origin`.
    pub line_offset: usize,
    /// Added to the column of a position in `text` to give the column in `origin`.
    pub column_offset: usize,
    /// `file:line:column` of the declaration.
    pub at: String,
}

/// Reads a mesh file, or every `*.yaml` and `*.yml` file directly in a directory (in name
/// order, one owner), and the policy files they name.
pub fn load(path: &Path) -> Result<Mesh, MeshError> {
    let io = |source| MeshError::Io {
        path: path.to_owned(),
        source,
    };
    let files = if std::fs::metadata(path).map_err(io)?.is_dir() {
        let mut files = Vec::new();
        for item in std::fs::read_dir(path).map_err(io)? {
            let item = item.map_err(io)?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            // Followed, as a symbolic link to a file is one of the directory's files: skipping
            // it would make `--prune` delete what it declares.
            let file = std::fs::metadata(item.path())
                .map_err(|source| MeshError::Io {
                    path: item.path(),
                    source,
                })?
                .is_file();
            if yaml && !name.starts_with('.') && file {
                files.push(item.path());
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(MeshError::Unusable {
                path: path.to_owned(),
                message: "no *.yaml or *.yml file in this directory: give a mesh file, or a \
                          directory of them"
                    .to_owned(),
            });
        }
        if files.len() > MAX_MESH_FILES {
            return Err(MeshError::Unusable {
                path: path.to_owned(),
                message: format!("more than {MAX_MESH_FILES} mesh files: combine some"),
            });
        }
        files
    } else {
        vec![path.to_owned()]
    };
    let mut mesh = Mesh {
        owner: String::new(),
        entries: Vec::new(),
        policies: Vec::new(),
        federations: Vec::new(),
        files: files.clone(),
    };
    let mut first_owner = String::new();
    let mut entries_at: HashMap<(String, String, Vec<String>), String> = HashMap::new();
    let mut policies_at: HashMap<String, String> = HashMap::new();
    let mut federations_at: HashMap<String, String> = HashMap::new();
    for file in &files {
        let text = read_limited(file, MAX_MESH_BYTES)?;
        let origin = file.display().to_string();
        let mut seen = Seen {
            entries: &mut entries_at,
            policies: &mut policies_at,
            federations: &mut federations_at,
        };
        let parsed = parse_with(&text, &origin, &mut seen)?;
        if mesh.owner.is_empty() {
            mesh.owner = parsed.owner;
            first_owner = origin.clone();
        } else if parsed.owner != mesh.owner {
            return Err(MeshError::Unusable {
                path: file.clone(),
                message: format!(
                    "owner `{}` differs from `{}` in {first_owner}: the files of a directory \
                     are applied together, as one owner",
                    parsed.owner, mesh.owner
                ),
            });
        }
        mesh.entries.extend(parsed.entries);
        if mesh.entries.len() > MAX_MESH_ENTRIES {
            return Err(MeshError::Unusable {
                path: file.clone(),
                message: format!(
                    "more than {MAX_MESH_ENTRIES} entries for one owner: split \
                                  them between owners"
                ),
            });
        }
        let base = file.parent().unwrap_or(Path::new("."));
        for mut f in parsed.federations {
            if let FederationBundle::File(relative) = &f.bundle {
                let path = base.join(relative);
                let text = read_limited(&path, crate::federation::MAX_BUNDLE_BYTES)?;
                f.bundle = FederationBundle::Text(text);
            }
            mesh.federations.push(f);
        }
        for p in parsed.policies {
            mesh.policies.push(match p.source {
                PolicySource::Inline {
                    text,
                    line_offset,
                    column_offset,
                } => LoadedPolicy {
                    name: p.name,
                    text,
                    origin: origin.clone(),
                    line_offset,
                    column_offset,
                    at: p.at,
                },
                PolicySource::File(relative) => {
                    let path = base.join(relative);
                    let text = read_limited(&path, meshid_policy::MAX_POLICY_BYTES)?;
                    let origin = path.display().to_string();
                    check_no_secret_in_text(&text, &origin)?;
                    LoadedPolicy {
                        name: p.name,
                        text,
                        origin,
                        line_offset: 0,
                        column_offset: 0,
                        at: p.at,
                    }
                }
            });
        }
    }
    Ok(mesh)
}

fn read_limited(path: &Path, limit: usize) -> Result<String, MeshError> {
    let io = |source| MeshError::Io {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > limit as u64 {
        return Err(MeshError::Unusable {
            path: path.to_owned(),
            message: format!("larger than the limit of {limit} bytes: split it"),
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    String::from_utf8(bytes).map_err(|e| MeshError::Unusable {
        path: path.to_owned(),
        message: format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
    })
}

/// Reads one mesh file's text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<MeshFile, MeshError> {
    let (mut entries, mut policies, mut federations) =
        (HashMap::new(), HashMap::new(), HashMap::new());
    let mut seen = Seen {
        entries: &mut entries,
        policies: &mut policies,
        federations: &mut federations,
    };
    parse_with(text, origin, &mut seen)
}

/// Where each object was declared, across the files of a directory.
struct Seen<'a> {
    entries: &'a mut HashMap<(String, String, Vec<String>), String>,
    policies: &'a mut HashMap<String, String>,
    federations: &'a mut HashMap<String, String>,
}

/// [`parse`], refusing declarations already `seen` (in other files of a directory), and adding
/// its own.
fn parse_with(text: &str, origin: &str, seen: &mut Seen<'_>) -> Result<MeshFile, MeshError> {
    let cx = Ctx { origin, text };
    let start = Pos { line: 1, column: 1 };
    if text.len() > MAX_MESH_BYTES {
        return Err(cx.err(
            start,
            format!("the file is larger than the limit of {MAX_MESH_BYTES} bytes: split it"),
        ));
    }
    let Some(root) = parse_document(cx)? else {
        return Err(cx.err(
            start,
            "the file is empty: write at least `owner:` and `entries:` or `policies:`",
        ));
    };
    check_no_secret(cx, &root)?;
    // Comments too: they are in the file as much as the values.
    check_no_secret_in_text(text, origin)?;
    let fields = cx.fields(&root, "a mesh file", TOP_KEYS)?;
    let owner_node = fields.get("owner").ok_or_else(|| {
        cx.err(
            root.pos,
            "missing `owner`: name the owner of what this file declares (for example \
             `owner: payments`); only objects with this owner are changed or pruned",
        )
    })?;
    let owner = cx.str(owner_node, "the owner label")?;
    cx.name(owner_node, owner, "owner label")?;
    let mut mesh = MeshFile {
        owner: owner.to_owned(),
        entries: Vec::new(),
        policies: Vec::new(),
        federations: Vec::new(),
    };
    if let Some(list) = fields.get("entries") {
        for node in cx.seq(list, "`entries`")? {
            let declared = entry(cx, node)?;
            if let Some(first) = seen
                .entries
                .insert(declared.identity(), declared.at.clone())
            {
                return Err(cx.err(
                    node.pos,
                    format!(
                        "entry {} (parent {}) with these selectors is already declared at \
                         {first}: declare it once",
                        declared.spec.spiffe_id, declared.spec.parent_id
                    ),
                ));
            }
            mesh.entries.push(declared);
        }
    }
    if let Some(list) = fields.get("policies") {
        for node in cx.seq(list, "`policies`")? {
            let declared = policy(cx, node)?;
            if let Some(first) = seen
                .policies
                .insert(declared.name.clone(), declared.at.clone())
            {
                return Err(cx.err(
                    node.pos,
                    format!(
                        "policy document `{}` is already declared at {first}: declare it once",
                        declared.name
                    ),
                ));
            }
            mesh.policies.push(declared);
        }
    }
    if let Some(list) = fields.get("federations") {
        for node in cx.seq(list, "`federations`")? {
            let declared = federation(cx, node)?;
            if let Some(first) = seen
                .federations
                .insert(declared.trust_domain.clone(), declared.at.clone())
            {
                return Err(cx.err(
                    node.pos,
                    format!(
                        "the federation with {} is already declared at {first}: declare it once",
                        declared.trust_domain
                    ),
                ));
            }
            mesh.federations.push(declared);
        }
    }
    Ok(mesh)
}

const TOP_KEYS: &[&str] = &["owner", "entries", "policies", "federations"];
const FEDERATION_KEYS: &[&str] = &[
    "trust_domain",
    "endpoint_url",
    "profile",
    "endpoint_spiffe_id",
    "bundle_file",
];

fn federation(cx: Ctx<'_>, node: &Node) -> Result<DeclaredFederation, MeshError> {
    let f = cx.fields(node, "a federation relationship", FEDERATION_KEYS)?;
    let text = |key: &str, required: bool| -> Result<String, MeshError> {
        match f.get(key) {
            Some(n) => Ok(cx.str(n, key)?.to_owned()),
            None if required => Err(cx.err(
                node.pos,
                format!(
                    "missing `{key}` in this federation relationship: it needs trust_domain, \
                     endpoint_url and profile"
                ),
            )),
            None => Ok(String::new()),
        }
    };
    let trust_domain = text("trust_domain", true)?;
    let refused = match spiffe::TrustDomain::new(&trust_domain) {
        Ok(td) if td.as_str() == trust_domain => None,
        Ok(_) => Some("write it lower case, without scheme or path".to_owned()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = refused {
        let n = f.get("trust_domain").unwrap_or(node);
        return Err(cx.err(
            n.pos,
            format!("invalid trust domain {}: {why}", quote(&trust_domain)),
        ));
    }
    let profile = text("profile", true)?;
    if !matches!(profile.as_str(), "https_web" | "https_spiffe") {
        let n = f.get("profile").unwrap_or(node);
        return Err(cx.err(
            n.pos,
            format!("profile {}: use https_web or https_spiffe", quote(&profile)),
        ));
    }
    let bundle = match f.get("bundle_file") {
        Some(n) => FederationBundle::File(PathBuf::from(cx.str(n, "a file path")?)),
        None => FederationBundle::None,
    };
    Ok(DeclaredFederation {
        at: cx.at(node.pos),
        trust_domain,
        endpoint_url: text("endpoint_url", true)?,
        profile,
        endpoint_spiffe_id: text("endpoint_spiffe_id", false)?,
        bundle,
    })
}
const ENTRY_KEYS: &[&str] = &[
    "spiffe_id",
    "parent_id",
    "selectors",
    "x509_svid_ttl",
    "jwt_svid_ttl",
    "dns_names",
    "federates_with",
    "admin",
    "hint",
];
const POLICY_KEYS: &[&str] = &["name", "file", "inline"];

fn entry(cx: Ctx<'_>, node: &Node) -> Result<DeclaredEntry, MeshError> {
    let f = cx.fields(node, "an entry", ENTRY_KEYS)?;
    let required = |key: &str| {
        f.get(key).ok_or_else(|| {
            cx.err(
                node.pos,
                format!("missing `{key}` in this entry: an entry needs spiffe_id, parent_id and selectors"),
            )
        })
    };
    let id = |key: &str| -> Result<(String, &Node, String), MeshError> {
        let n = required(key)?;
        let text = cx.str(n, "a SPIFFE ID")?;
        let id = meshid_api::id::parse(text)
            .map_err(|e| cx.err(n.pos, format!("invalid {key} {}: {e}", quote(text))))?;
        Ok((text.to_owned(), n, id.path().to_owned()))
    };
    let (spiffe_id, id_node, path) = id("spiffe_id")?;
    if path.is_empty() {
        return Err(cx.err(
            id_node.pos,
            format!(
                "spiffe_id {} has no path; a workload identity needs one, e.g. \
                 spiffe://example.org/web",
                quote(&spiffe_id)
            ),
        ));
    }
    if path == entry::RESERVED_PATH || path.starts_with(&format!("{}/", entry::RESERVED_PATH)) {
        return Err(cx.err(
            id_node.pos,
            format!(
                "spiffe_id {} is under {}/, which is reserved for meshid's agents and CA servers",
                quote(&spiffe_id),
                entry::RESERVED_PATH
            ),
        ));
    }
    let (parent_id, ..) = id("parent_id")?;
    let selectors_node = required("selectors")?;
    let items = cx.seq(selectors_node, "`selectors`")?;
    if items.is_empty() {
        return Err(cx.err(
            selectors_node.pos,
            "an entry needs at least one selector, e.g. unix:uid:1000",
        ));
    }
    let strings = |n: &Node, what: &str, max: usize, check: &dyn Fn(&str) -> Result<(), String>| {
        let items = cx.seq(n, what)?;
        if items.len() > max {
            return Err(cx.err(
                n.pos,
                format!("{} {what}: at most {max} are allowed", items.len()),
            ));
        }
        items
            .iter()
            .map(|item| {
                let s = cx.str(item, what)?;
                check(s).map_err(|m| cx.err(item.pos, m))?;
                Ok(s.to_owned())
            })
            .collect::<Result<Vec<_>, MeshError>>()
    };
    let selectors = strings(
        selectors_node,
        "`selectors`",
        entry::MAX_SELECTORS,
        &|s: &str| Selector::parse(s).map(drop).map_err(|e| e.to_string()),
    )?;
    let dns_names = match f.get("dns_names") {
        Some(n) => strings(n, "`dns_names`", entry::MAX_DNS_NAMES, &|s: &str| {
            entry::validate_dns_name(s).map_err(|e| e.to_string())
        })?,
        None => Vec::new(),
    };
    let federates_with = match f.get("federates_with") {
        Some(n) => {
            strings(
                n,
                "`federates_with`",
                usize::MAX,
                &|s: &str| match spiffe::TrustDomain::new(s) {
                    Ok(td) if td.as_str() == s => Ok(()),
                    Ok(_) => Err(format!(
                        "invalid trust domain {}: write it lower case, without scheme or path",
                        quote(s)
                    )),
                    Err(e) => Err(format!("invalid trust domain {}: {e}", quote(s))),
                },
            )?
        }
        None => Vec::new(),
    };
    let x509_svid_ttl = match f.get("x509_svid_ttl") {
        Some(n) => cx.ttl(n, "x509_svid_ttl", entry::MAX_X509_TTL)?,
        None => 0,
    };
    let jwt_svid_ttl = match f.get("jwt_svid_ttl") {
        Some(n) => cx.ttl(n, "jwt_svid_ttl", entry::MAX_JWT_TTL)?,
        None => 0,
    };
    let admin = match f.get("admin") {
        Some(n) => cx.bool(n, "admin")?,
        None => false,
    };
    let hint = match f.get("hint") {
        Some(n) => {
            let h = cx.str(n, "a hint")?;
            if h.len() > entry::MAX_HINT_LEN {
                return Err(cx.err(
                    n.pos,
                    format!(
                        "the hint is {} bytes; at most {} are allowed",
                        h.len(),
                        entry::MAX_HINT_LEN
                    ),
                ));
            }
            h.to_owned()
        }
        None => String::new(),
    };
    Ok(DeclaredEntry {
        at: cx.at(node.pos),
        spec: EntrySpec {
            id: None,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            dns_names,
            federates_with,
            admin,
            hint,
        },
    })
}

fn policy(cx: Ctx<'_>, node: &Node) -> Result<DeclaredPolicy, MeshError> {
    let f = cx.fields(node, "a policy document", POLICY_KEYS)?;
    let name_node = f.get("name").ok_or_else(|| {
        cx.err(
            node.pos,
            "missing `name` in this policy document: name it (for example `name: payments`)",
        )
    })?;
    let name = cx.str(name_node, "a document name")?;
    cx.name(name_node, name, "policy document name")?;
    // Positions at the `inline` key: a block's own starts at its text.
    let source = match (f.get("file"), f.entry("inline")) {
        (Some(file), None) => {
            let path = cx.str(file, "a file path")?;
            PolicySource::File(PathBuf::from(path))
        }
        (None, Some((key, inline))) => {
            let (text, style) = match &inline.value {
                Value::Scalar(text, style) if !inline.is_null() => (text, *style),
                _ => {
                    return Err(cx.err(
                        key.pos,
                        format!(
                            "expected the policy document as a literal block (`inline: |`), \
                             found {}",
                            inline.kind()
                        ),
                    ))
                }
            };
            if style != ScalarStyle::Literal {
                return Err(cx.err(
                    key.pos,
                    "write the policy document as a literal block (`inline: |` and the \
                     document indented on the lines below), so that its lines stay as written",
                ));
            }
            let (line_offset, column_offset) = cx.block_offsets(inline.pos, text);
            PolicySource::Inline {
                text: text.clone(),
                line_offset,
                column_offset,
            }
        }
        (Some(_), Some((key, _))) => {
            return Err(cx.err(key.pos, "give either `file` or `inline`, not both"))
        }
        (None, None) => {
            return Err(cx.err(
                node.pos,
                "missing `file` or `inline` in this policy document: name its file (relative \
                 to this one), or write it inline as a literal block",
            ))
        }
    };
    Ok(DeclaredPolicy {
        name: name.to_owned(),
        at: cx.at(node.pos),
        source,
    })
}

/// Refuses keys named like secrets and values that look like one, anywhere in the file.
fn check_no_secret(cx: Ctx<'_>, node: &Node) -> Result<(), MeshError> {
    match &node.value {
        Value::Scalar(text, _) => {
            if let Some(what) = looks_secret(text) {
                return Err(cx.err(node.pos, secret_message(what)));
            }
        }
        Value::Seq(items) => {
            for item in items {
                check_no_secret(cx, item)?;
            }
        }
        Value::Map(entries) => {
            for (key, value) in entries {
                let name = scalar_text(key);
                if secret_key(name) {
                    return Err(cx.err(
                        key.pos,
                        format!(
                            "`{}` looks like a secret: a mesh file never holds one (it is meant \
                             for version control, and nothing in it is secret); join tokens \
                             come from `meshid-ca token generate` when an agent enrols, and \
                             keys never leave the CA and the agents",
                            clip(name)
                        ),
                    ));
                }
                check_no_secret(cx, key)?;
                check_no_secret(cx, value)?;
            }
        }
    }
    Ok(())
}

/// Refuses a text (a mesh file or a policy document) that holds something that looks like a
/// secret.
fn check_no_secret_in_text(text: &str, origin: &str) -> Result<(), MeshError> {
    match secret_line(text) {
        Some((line, what)) => Err(MeshError::Invalid {
            origin: origin.to_owned(),
            line,
            column: 1,
            message: secret_message(what),
        }),
        None => Ok(()),
    }
}

/// The first line of `text` (from 1) that holds something that looks like a secret, and what.
pub fn secret_line(text: &str) -> Option<(usize, &'static str)> {
    yaml::lines(text)
        .enumerate()
        .find_map(|(i, line)| looks_secret(line).map(|what| (i + 1, what)))
}

fn secret_message(what: &str) -> String {
    format!(
        "this looks like {what}: a mesh file and its policy documents never hold secrets (they \
         are meant for version control); remove it"
    )
}

/// Whether a key is named like a secret (`token`, `password`, `private_key`, ...).
fn secret_key(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "token",
        "secret",
        "password",
        "passwd",
        "private",
        "credential",
        "apikey",
        "api_key",
    ]
    .iter()
    .any(|w| name.contains(w))
        || name == "key"
        || name.ends_with("_key")
        || name.ends_with("-key")
}

/// What `text` looks like if it holds a secret: a PEM private key, a JWT, or a 256-bit
/// base64url value such as a join token.
pub fn looks_secret(text: &str) -> Option<&'static str> {
    if text.contains("PRIVATE KEY-----") {
        return Some("a PEM private key");
    }
    let words = text.split(|c: char| c.is_whitespace() || "\"'`,;[]{}()<>=".contains(c));
    for word in words {
        let b64 = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let parts: Vec<&str> = word.split('.').collect();
        if parts.len() == 3
            && parts[0].starts_with("eyJ")
            && word.len() >= 30
            && parts.iter().all(|p| b64(p))
        {
            return Some("a JWT");
        }
        if word.len() == 43
            && b64(word)
            && word.bytes().any(|b| b.is_ascii_uppercase())
            && word.bytes().any(|b| b.is_ascii_lowercase())
            && word.bytes().any(|b| b.is_ascii_digit())
        {
            return Some("a join token (or another 256-bit secret)");
        }
    }
    None
}

/// User text for a message, quoted: at most 64 characters.
fn quote(s: &str) -> String {
    format!("{:?}", clip(s))
}

/// Names the file in errors; holds its text (for the indentation of inline documents). The
/// YAML tree and its strict decoding are meshid-policy's, so that mesh files and policy files
/// refuse the same things with the same messages.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
}

/// A mesh file may declare up to [`MAX_MESH_ENTRIES`] entries of about 25 nodes each.
const LIMITS: yaml::Limits = yaml::Limits {
    depth: 16,
    nodes: 400_000,
    what: "a mesh file",
};

impl From<PolicyError> for MeshError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Syntax {
                origin,
                line,
                column,
                message,
            }
            | PolicyError::Invalid {
                origin,
                line,
                column,
                message,
            } => MeshError::Invalid {
                origin,
                line,
                column,
                message,
            },
            other => MeshError::Unusable {
                path: PathBuf::new(),
                message: other.to_string(),
            },
        }
    }
}

/// Parses the text as at most one YAML document (`None`: empty).
fn parse_document(cx: Ctx<'_>) -> Result<Option<Node>, MeshError> {
    Ok(yaml::parse_limited(cx.text, cx.yaml(), LIMITS)?)
}

impl Ctx<'_> {
    fn err(&self, pos: Pos, message: impl Into<String>) -> MeshError {
        MeshError::Invalid {
            origin: self.origin.to_owned(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        }
    }

    fn at(&self, pos: Pos) -> String {
        format!("{}:{}:{}", self.origin, pos.line, pos.column)
    }

    fn yaml(&self) -> yaml::Ctx<'_> {
        yaml::Ctx {
            origin: self.origin,
        }
    }

    /// The entries of a mapping, refusing keys not in `allowed`.
    fn fields<'n>(
        &self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Result<Fields<'n>, MeshError> {
        Ok(self.yaml().fields(node, what, allowed)?)
    }

    fn seq<'n>(&self, node: &'n Node, what: &str) -> Result<&'n [Node], MeshError> {
        Ok(self.yaml().seq(node, what)?)
    }

    fn str<'n>(&self, node: &'n Node, what: &str) -> Result<&'n str, MeshError> {
        Ok(self.yaml().str(node, what)?)
    }

    /// An owner label or document name: the rule of policy document names.
    fn name(&self, node: &Node, name: &str, what: &str) -> Result<(), MeshError> {
        crate::service::policy::check_policy_name(name).map_err(|_| {
            self.err(
                node.pos,
                format!(
                    "invalid {what} {}: use lowercase letters, digits, '.', '_' and '-', \
                     starting with a letter or digit, at most {} characters",
                    quote(name),
                    crate::service::policy::MAX_POLICY_NAME
                ),
            )
        })
    }

    fn bool(&self, node: &Node, what: &str) -> Result<bool, MeshError> {
        match &node.value {
            Value::Scalar(s, ScalarStyle::Plain) if s == "true" => Ok(true),
            Value::Scalar(s, ScalarStyle::Plain) if s == "false" => Ok(false),
            _ => Err(self.err(
                node.pos,
                format!(
                    "expected `{what}: true` or `{what}: false`, found {}",
                    node.kind()
                ),
            )),
        }
    }

    /// A lifetime: whole seconds, or a duration such as `5m` or `1h`; 0 for the CA default.
    fn ttl(&self, node: &Node, field: &str, max: std::time::Duration) -> Result<u64, MeshError> {
        let text = self.str(node, "a lifetime (seconds, or a duration such as 5m)")?;
        let secs = match text.parse::<u64>() {
            Ok(secs) => secs,
            Err(_) => {
                let d = humantime::parse_duration(text).map_err(|e| {
                    self.err(
                        node.pos,
                        format!(
                            "invalid {field} {}: {e}; write seconds or a duration such as 5m",
                            quote(text)
                        ),
                    )
                })?;
                if d.subsec_nanos() != 0 {
                    return Err(self.err(
                        node.pos,
                        format!("{field} {} is not whole seconds", quote(text)),
                    ));
                }
                d.as_secs()
            }
        };
        if secs > max.as_secs() {
            return Err(self.err(
                node.pos,
                format!(
                    "{field} {} is out of range: use {}s to {}s (or leave it out for the CA's \
                     default)",
                    quote(text),
                    entry::MIN_TTL.as_secs(),
                    max.as_secs()
                ),
            ));
        }
        Ok(secs)
    }

    /// Where the text of a literal block sits in the file, from the position the parser gives
    /// it (its first line that is not empty, after the indentation): the line before its first
    /// line, and its indentation.
    fn block_offsets(&self, pos: Pos, value: &str) -> (usize, usize) {
        let leading_empty = value.lines().take_while(|l| l.is_empty()).count();
        (
            pos.line.saturating_sub(1 + leading_empty),
            pos.column.saturating_sub(1),
        )
    }
}

#[cfg(test)]
mod tests;
