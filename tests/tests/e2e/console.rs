//! The CA's web console over a running mesh: its pages in a real browser (Debian's Chromium,
//! driven by playwright-core, `tests/console/drive.mjs`), and its access rules from another
//! host (`remote`); the refusals proxies report through their agents (`denials`).

mod browser;
mod denials;
mod remote;
