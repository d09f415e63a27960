#!/bin/sh
# Initialise the registry's data directory once; every later start is a no-op.
#
# 1. The data dir already holds a CA (ca.key): nothing to do.
# 2. The optional Secret `trustmesh-ca` is mounted at $TRUSTMESH_CA_DIR with ca.key and
#    ca.crt (the CA was made outside the cluster with `trustmesh registry init`): copy
#    it in, private key 0600. The database is created by `registry serve`.
# 3. Otherwise make a new CA and operator credential here (`trustmesh registry init`);
#    docs/kubernetes.md shows how to read the fingerprint and credential back out.
set -eu
data="${TRUSTMESH_DATA_DIR:?TRUSTMESH_DATA_DIR is not set}"
ca_dir="${TRUSTMESH_CA_DIR:-/etc/trustmesh/ca}"

if [ -f "$data/ca.key" ]; then
    echo "init-datadir: $data is already initialised"
    exit 0
fi
if [ -f "$ca_dir/ca.key" ] && [ -f "$ca_dir/ca.crt" ]; then
    umask 077
    mkdir -p "$data"
    chmod 700 "$data"
    cp "$ca_dir/ca.crt" "$data/ca.crt.tmp"
    cp "$ca_dir/ca.crt" "$data/bundle.pem.tmp"
    chmod 644 "$data/ca.crt.tmp" "$data/bundle.pem.tmp"
    mv "$data/ca.crt.tmp" "$data/ca.crt"
    mv "$data/bundle.pem.tmp" "$data/bundle.pem"
    cp "$ca_dir/ca.key" "$data/ca.key.tmp"
    chmod 600 "$data/ca.key.tmp"
    mv "$data/ca.key.tmp" "$data/ca.key"  # last: its presence means "initialised"
    echo "init-datadir: installed the CA from $ca_dir into $data"
    exit 0
fi
exec trustmesh registry init \
    --data-dir "$data" \
    --trust-domain "${TRUSTMESH_TRUST_DOMAIN:?TRUSTMESH_TRUST_DOMAIN is not set}" \
    --registry "${TRUSTMESH_REGISTRY_ADDRESS:?TRUSTMESH_REGISTRY_ADDRESS is not set}"
