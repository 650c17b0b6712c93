#!/bin/sh
# A Web PKI for tests, made with openssl: DIR/web-ca.pem (the root), and DIR/web.pem with
# DIR/web.key (mode 0600) for the host names localhost and 127.0.0.1. Used by the federation
# and OIDC tests (https_web bundle endpoints) of ca/tests and tests/tests/e2e.
set -eu
cd "$1"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout web-ca.key -out web-ca.pem -days 2 -subj "/CN=meshid test web root" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout web.key -out web.csr -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' > leaf.ext
openssl x509 -req -in web.csr -CA web-ca.pem -CAkey web-ca.key -CAcreateserial -days 1 \
    -out web.pem -extfile leaf.ext 2>/dev/null
chmod 600 web.key web-ca.key
