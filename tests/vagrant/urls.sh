#!/usr/bin/env bash
# The end of `make up`: where the cluster's proxy is and ready-to-paste curl
# lines to subscribe and publish. The port and the token secret are read from
# what the deploy used: the inventory Vagrant generated and the secret
# site.yml generated (inventories/vagrant/).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
inventory="$root/inventories/vagrant/vagrant_ansible_inventory"
secret_file="$root/inventories/vagrant/.secrets/ssehub_token_secret"
for f in "$inventory" "$secret_file"; do
  [ -r "$f" ] || { echo "urls.sh: $f is missing: has \`vagrant up\` deployed?" >&2; exit 1; }
done

port="$(sed -n 's/^ssekit_vagrant_https_port=//p' "$inventory")"
proxy="$(sed -n 's/^ssekit_vagrant_proxy=//p' "$inventory")"
base="https://localhost:$port"
apps="$(grep -c '^app[0-9]* ansible_host=' "$inventory")"
publish_token="$(SSEHUB_TOKEN_SECRET="$(cat "$secret_file")" \
  "$root/.venv/bin/ssehub" token --publish 'chat.*' --ttl 86400)"

cat <<EOF

ssekit is up: $proxy, $apps app hosts, Redis and PostgreSQL (vagrant status lists them).
The certificate is self-signed (nginx) or from Caddy's internal CA: curl -k, and
accept it once in the browser.
  chat demo:  $base/   (a message published to chat.lobby shows there)
  subscribe:  curl -Nk '$base/events/?channel=chat.lobby'
  publish:    curl -k -H 'Authorization: Bearer $publish_token' \\
                -H 'Content-Type: application/json' \\
                -d "{\\"channel\\": \\"chat.lobby\\", \\"data\\": {\\"id\\": \\"curl-\$RANDOM\\", \\"author\\": \\"curl\\", \\"text\\": \\"hello\\"}}" \\
                $base/publish/
  deploy again:  SSEKIT_PROXY=$proxy SSEKIT_NUM_APP=$apps vagrant provision
  shell on a host:  vagrant ssh app1
Stop it with: make down
EOF
