#!/usr/bin/env bash
# Make what the configs of this directory include, in DIR (default /etc/moe2/nats), owner-only:
#   certs/ca.pem, certs/ca-key.pem   a CA for the whole deployment (keep ca-key.pem offline)
#   certs/server.pem, server-key.pem one certificate for every nats-server (server and client
#                                    use: routes between hub nodes are mutual TLS)
#   auth/*.nk, authorization.conf    one nkey user per role (`moe2 auth init`; docs/security.md)
#   leaf-users.conf                  the hub side of the leaf user (its password)
#   leaf-remote.conf                 the edge side: the hub's leaf URLs with that password
# Existing files are kept: delete one and run again to replace it (docs/deploy.md, rotation).
#
# Usage: gen-secrets.sh [DIR]
#   HUBS="hub-1:7422 hub-2:7422 hub-3:7422"  the hub nodes' leaf addresses (host:port)
#   EXPERTS=a,b,c                            expert ids to make users for
#   SANS="DNS:hub.example.org,IP:10.0.0.5"   more names in the server certificate
#   MOE2="moe2"                              the moe2 command (words allowed)
set -euo pipefail
dir=${1:-/etc/moe2/nats}
hubs=${HUBS:-hub-1:7422 hub-2:7422 hub-3:7422}
experts=${EXPERTS:-a,b,c}
read -ra moe2 <<<"${MOE2:-moe2}"
umask 077
mkdir -p "$dir/certs"
certs=$dir/certs

if [[ ! -f $certs/ca.pem ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=moe2 NATS CA" -keyout "$certs/ca-key.pem" -out "$certs/ca.pem" 2>/dev/null
  echo "made $certs/ca.pem"
fi

if [[ ! -f $certs/server.pem ]]; then
  sans="DNS:localhost,IP:127.0.0.1"
  for hub in $hubs; do
    host=${hub%:*}
    if [[ $host =~ ^[0-9.]+$ ]]; then sans+=",IP:$host"; else sans+=",DNS:$host"; fi
  done
  [[ -n ${SANS:-} ]] && sans+=",$SANS"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=moe2 nats-server" -keyout "$certs/server-key.pem" -out "$certs/server.csr" \
    2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$sans" >"$certs/ext.cnf"
  openssl x509 -req -in "$certs/server.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca-key.pem" \
    -CAcreateserial -days 825 -extfile "$certs/ext.cnf" -out "$certs/server.pem" 2>/dev/null
  rm -f "$certs/server.csr" "$certs/ext.cnf"
  echo "made $certs/server.pem ($sans)"
fi

"${moe2[@]}" auth init --dir "$dir/auth" --experts "$experts" >/dev/null
cp "$dir/auth/authorization.conf" "$dir/authorization.conf"
echo "users: $dir/authorization.conf (seeds in $dir/auth)"

if [[ ! -f $dir/leaf-users.conf ]]; then
  password=$(openssl rand -hex 24)
  printf 'authorization { user: "leaf", password: "%s", timeout: 2 }\n' "$password" \
    >"$dir/leaf-users.conf"
  {
    echo "leafnodes {"
    echo "  remotes: ["
    echo "    {"
    echo "      urls: ["
    for hub in $hubs; do echo "        \"nats-leaf://leaf:$password@$hub\""; done
    echo "      ]"
    echo "      tls { ca_file: \"$certs/ca.pem\", timeout: 2 }"
    echo "    }"
    echo "  ]"
    echo "}"
  } >"$dir/leaf-remote.conf"
  echo "leaf user: $dir/leaf-users.conf (hub), $dir/leaf-remote.conf (edge)"
fi
