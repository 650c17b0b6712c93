//! The console's front end, built from `ca/console/` (TypeScript, bundled with esbuild; see
//! its README) and embedded in the binary, so running the console needs no Node.js and
//! fetches nothing at run time. The built files are checked in; CI rebuilds them and fails on
//! any difference.

use axum::http::{header, HeaderMap, HeaderValue};

/// The Content-Security-Policy of every response: only this origin's own script, style and
/// connections; no inline script or style, no frames, no plugins, no other origin.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// An embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Its MIME type.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// The page every console route serves.
pub const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../../console/dist/index.html"),
};

/// The embedded file at `path` (under `/assets/`).
pub fn get(path: &str) -> Option<Asset> {
    match path {
        "app.js" => Some(Asset {
            content_type: "text/javascript; charset=utf-8",
            body: include_bytes!("../../console/dist/app.js"),
        }),
        "app.css" => Some(Asset {
            content_type: "text/css; charset=utf-8",
            body: include_bytes!("../../console/dist/app.css"),
        }),
        _ => None,
    }
}

/// Adds the headers every console response carries: the CSP, no sniffing, no referrer, no
/// framing, no caching of API answers (assets revalidate), and HSTS over HTTPS.
pub fn secure(headers: &mut HeaderMap, api: bool, https: bool) {
    let set = |h: &mut HeaderMap, name: header::HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(headers, header::CONTENT_SECURITY_POLICY, CSP);
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(
        headers,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        headers,
        header::HeaderName::from_static("cross-origin-resource-policy"),
        "same-origin",
    );
    set(
        headers,
        header::CACHE_CONTROL,
        if api { "no-store" } else { "no-cache" },
    );
    if https {
        set(
            headers,
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=31536000",
        );
    }
}
