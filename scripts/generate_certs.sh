#!/usr/bin/env bash
# Development TLS certificates for a SuperLink: a private CA and a server
# certificate signed by it. Not for production: the CA key sits next to the
# certificates unencrypted; use your organisation's CA there.
#
#   bash scripts/generate_certs.sh [-o OUT_DIR] [-d DAYS] [-f] [HOST ...]
#
# HOST: extra names or IP addresses the SuperLink is reached by (its DNS
# name, its LAN address); localhost and 127.0.0.1 are always included.
# Writes OUT_DIR/ca.crt (give it to every SuperNode and to the machine that
# runs `flwr run`), OUT_DIR/server.pem + server.key (SuperLink only) and
# OUT_DIR/ca.key (keep it private; it signs new server certificates).
set -euo pipefail

out=certificates
days=365
force=0
usage="usage: $0 [-o OUT_DIR] [-d DAYS] [-f] [HOST ...]"
while getopts "o:d:fh" opt; do
    case $opt in
        o) out=$OPTARG ;;
        d) days=$OPTARG ;;
        f) force=1 ;;
        h) echo "$usage"; exit 0 ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

command -v openssl >/dev/null || { echo "generate_certs.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }
[[ $days =~ ^[1-9][0-9]*$ ]] || { echo "generate_certs.sh: -d DAYS must be a positive integer, got '$days'" >&2; exit 2; }
# Replacing a CA silently would lock out every node that trusts the old one.
if [[ $force == 0 && -e $out/ca.crt ]]; then
    echo "generate_certs.sh: $out/ca.crt exists; pass -f to replace all certificates in $out" >&2
    exit 1
fi
mkdir -p "$out"

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
    [[ -n $host ]] || continue
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then
        entry="IP:$host"
    else
        entry="DNS:$host"
    fi
    # a name given twice (or one of the defaults) is listed once
    [[ ",$sans," == *",$entry,"* ]] || sans+=",$entry"
done
# The subject CN is informational; clients check the SANs. ECDSA P-384 keys:
# as strong as RSA-7680 and made in milliseconds rather than seconds.
cn=${1:-localhost}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes -days "$days" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=anytime-fl development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>"$tmp/log" || { cat "$tmp/log" >&2; exit 1; }

openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes \
    -keyout "$out/server.key" -out "$tmp/server.csr" -subj "/CN=$cn" 2>"$tmp/log" \
    || { cat "$tmp/log" >&2; exit 1; }

cat >"$tmp/ext.cnf" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$sans
EOF
openssl x509 -req -sha384 -days "$days" -in "$tmp/server.csr" \
    -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -CAserial "$tmp/ca.srl" \
    -out "$out/server.pem" -extfile "$tmp/ext.cnf" 2>"$tmp/log" || { cat "$tmp/log" >&2; exit 1; }

chmod 600 "$out/ca.key" "$out/server.key"
openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "generate_certs.sh: wrote $out/{ca.crt,ca.key,server.pem,server.key}, valid $days days, SANs $sans"
