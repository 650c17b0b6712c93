"""An OIDC relying party, as a cloud service would be: PyJWT (PyPI) verifies a JWT-SVID by
discovery from the issuer URL alone.

Usage: oidc.py ISSUER CA_FILE AUDIENCE TOKEN [OTHER_TOKEN]

Reads ISSUER/.well-known/openid-configuration over HTTPS (trusting CA_FILE, a Web PKI root),
takes the signing key for TOKEN's kid from the jwks_uri with PyJWKClient, and verifies TOKEN's
signature, audience, issuer and expiry with the algorithms the discovery document lists.
Prints `ok CLAIMS_JSON`; then, when OTHER_TOKEN is given (signed with a key the JWKS does not
hold), `refused REASON` if it is refused. Any other outcome exits non-zero.
"""

import json
import ssl
import sys
import urllib.request

import jwt


def main():
    issuer, cafile, audience, token = sys.argv[1:5]
    other = sys.argv[5] if len(sys.argv) > 5 else None
    ctx = ssl.create_default_context(cafile=cafile)
    with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", context=ctx) as r:
        meta = json.load(r)
    assert meta["issuer"] == issuer, meta
    algorithms = meta["id_token_signing_alg_values_supported"]
    client = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=ctx, cache_jwk_set=False)
    key = client.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=algorithms,
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "iss", "sub", "aud"]},
    )
    header = jwt.get_unverified_header(token)
    assert header.get("kid") == key.key_id, header
    print("ok " + json.dumps(claims))
    if other is not None:
        try:
            k = client.get_signing_key_from_jwt(other)
            jwt.decode(other, k.key, algorithms=algorithms, audience=audience, issuer=issuer)
        except (jwt.PyJWKClientError, jwt.InvalidTokenError) as e:
            print(f"refused {type(e).__name__}: {e}")
        else:
            print("FAIL: a token signed with a key the JWKS does not hold was accepted")
            sys.exit(1)


if __name__ == "__main__":
    main()
