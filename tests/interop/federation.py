"""Which trust domains' bundles a workload gets from the Workload API, as py-spiffe sees them.

Usage: federation.py SOCKET TRUST_DOMAIN...
       federation.py validate SOCKET TOKEN AUDIENCE

Prints one JSON object: for each trust domain, the SHA-256 fingerprints of its X.509
authorities in the X.509 context (FetchX509SVID: the SVID's bundle and federated_bundles), in
FetchX509Bundles, and the key ids of its JWT authorities in FetchJWTBundles (null where the
trust domain is missing). With `validate`: ValidateJWTSVID of TOKEN for AUDIENCE, printing
`ok SPIFFE_ID` or `refused REASON`.
"""

import hashlib
import json
import sys

from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient


def fingerprints(bundle):
    if bundle is None:
        return None
    return sorted(
        hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
        for c in bundle.x509_authorities
    )


def validate(socket, token, audience):
    from spiffe.workloadapi.errors import ValidateJwtSvidError

    client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=15)
    try:
        svid = client.validate_jwt_svid(token, audience)
    except ValidateJwtSvidError as e:
        print(f"refused {e}")
        return
    print(f"ok {svid.spiffe_id}")


def main():
    if sys.argv[1] == "validate":
        validate(*sys.argv[2:5])
        return
    socket, tds = sys.argv[1], sys.argv[2:]
    client = WorkloadApiClient(socket_path=f"unix:{socket}", default_timeout=15)
    context = client.fetch_x509_context()
    x509 = client.fetch_x509_bundles()
    jwt = client.fetch_jwt_bundles()
    out = {}
    for name in tds:
        td = TrustDomain(name)
        j = jwt.get_bundle_for_trust_domain(td)
        out[name] = {
            "context": fingerprints(context.x509_bundle_set.get_bundle_for_trust_domain(td)),
            "bundles": fingerprints(x509.get_bundle_for_trust_domain(td)),
            "jwt": None if j is None else sorted(j.jwt_authorities.keys()),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
