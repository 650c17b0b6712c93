//! meshid's benchmark binaries: `meshid-bench` (the node agent and the node API) and
//! `meshid-proxy-bench` (the sidecar against haproxy, stunnel and the plain relay). They run the
//! real binaries through the `meshid-tests` harness; results and commands are in BENCHMARKS.md.
//! A package of their own, so that the end-to-end tests link no server library.
