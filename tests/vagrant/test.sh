#!/usr/bin/env bash
# `make test-vagrant`: the README's first command, `make up`, from scratch.
#   1. make up (mk/vagrant.mk): this machine prepared (cached: test-vagrant
#      built the image), vagrant up with the docker provider, site.yml ending
#      with the smoke test (one event across the proxy), then the URLs and curl
#      lines (tests/vagrant/urls.sh); the chat demo URL it prints answers 200;
#   2. vagrant ssh reaches a host, and the hub runs there;
#   3. vagrant provision deploys again: every host in the PLAY RECAP, the
#      controller's smoke play included, reports changed=0;
#   4. the subscribe and publish lines make up printed work as pasted;
#   5. make down, always (also on failure or interrupt).
# Needs what `make vagrant-image` prepares (vagrant, dockerd, the image, .venv).
# Logs: .cache/vagrant/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export PATH="$root/.venv/bin:$PATH" VAGRANT_NO_COLOR=1
# The make that runs `make test-vagrant` runs up and down too; MAKEFLAGS stays,
# so variables given on its command line (VAGRANT_IMAGE=...) reach them.
make=(make --no-print-directory -C "$root")
logs="$root/.cache/vagrant"
mkdir -p "$logs"

step() { echo "==> test-vagrant: $*"; }
fail() { echo "test-vagrant: FAILED: $*" >&2; exit 1; }
# Runs a long step with its output in a log; prints the log's tail if it fails.
logged() {
  local name="$1" limit="$2"; shift 2
  local started=$SECONDS
  if ! timeout "$limit" "$@" >"$logs/$name.log" 2>&1; then
    tail -n 60 "$logs/$name.log" >&2
    fail "$name (log: $logs/$name.log)"
  fi
  step "$name took $((SECONDS - started)) s"
}

# The containers have fixed names: another checkout's cluster (or `make up`
# here) must go first, and this test must not destroy someone's cluster.
if [ -n "$(docker ps -aq --filter 'name=^/ssekit-vagrant-')" ]; then
  fail "containers named ssekit-vagrant-* exist; run \`make down\` (or \`vagrant destroy -f\` in the checkout that made them) first"
fi

destroy() {
  local rc=$?
  trap - EXIT INT TERM
  step "make down"
  timeout 900 "${make[@]}" down >"$logs/down.log" 2>&1 || { tail -n 20 "$logs/down.log" >&2; rc=1; }
  step "$( [ "$rc" = 0 ] && echo passed || echo failed ) in $SECONDS s"
  exit "$rc"
}
trap destroy EXIT
trap 'exit 130' INT TERM

step "make up (vagrant up: machines, then site.yml and the smoke test; then the URLs)"
logged up 2700 "${make[@]}" up
grep -E "msg: 'ok: event [0-9]+ crossed" "$logs/up.log" || fail "no smoke test result in $logs/up.log"
# What make up printed last (tests/vagrant/urls.sh), checked below as a user would.
sed -n '/^ssekit is up: /,$p' "$logs/up.log" >"$logs/urls.txt"
[ -s "$logs/urls.txt" ] || fail "make up printed no URLs (tests/vagrant/urls.sh; log: $logs/up.log)"

step "the chat demo URL make up printed answers with the chat page"
chat="$(sed -n 's/^  chat demo:  \(https:[^ ]*\).*/\1/p' "$logs/urls.txt")"
[ -n "$chat" ] || fail "no chat demo line in $logs/urls.txt"
status="$(curl -sk -o "$logs/chat.html" -w '%{http_code}' --max-time 10 "$chat")" || status="curl exit $?"
[ "$status" = 200 ] || fail "GET $chat answered $status"
grep -q '<title>ssehub chat: ' "$logs/chat.html" || fail "GET $chat is not the chat page ($logs/chat.html)"

step "vagrant ssh app1: the hub runs"
[ "$(timeout 60 vagrant ssh app1 -c 'systemctl is-active ssehub' 2>/dev/null | tr -d '\r')" = active ] ||
  fail "vagrant ssh app1 did not find ssehub active"

step "vagrant provision (the deploy again: nothing may change)"
logged provision 1800 vagrant provision
recap="$(awk '/^PLAY RECAP/ { seen = 1; next } seen && / : ok=/' "$logs/provision.log")"
echo "$recap"
machines="$(vagrant status --machine-readable | awk -F, '$3 == "state" { n++ } END { print n }')"
[ "$(grep -c . <<<"$recap")" -eq "$((machines + 1))" ] ||
  fail "the PLAY RECAP should list $machines machines and localhost"
grep -q '^localhost .* ok=[1-9]' <<<"$recap" || fail "the smoke play did not run on localhost"
if grep -vE ' changed=0 +unreachable=0 +failed=0 ' <<<"$recap"; then
  fail "the second deploy changed something or failed (above; log: $logs/provision.log)"
fi
grep -E "msg: 'ok: event [0-9]+ crossed" "$logs/provision.log" || fail "no smoke test result after provision"

step "make up's last lines (tests/vagrant/urls.sh): the printed curl lines work as pasted"
subscribe="$(sed -n 's/^  subscribe:  //p' "$logs/urls.txt")"
publish="$(awk '/^  publish:/ { p = 1 } p { print } p && /\/publish\/$/ { exit }' "$logs/urls.txt" |
  sed 's/^  publish:  //')"
[ -n "$subscribe" ] && [ -n "$publish" ] || fail "no subscribe/publish lines in $logs/urls.txt"
(eval "timeout 10 $subscribe" >"$logs/subscribed.txt" 2>&1 || true) &
sleep 3
eval "$publish" >"$logs/published.txt" 2>&1 || fail "the publish line (log: $logs/published.txt)"
grep -q '"id"' "$logs/published.txt" || fail "the publish line got no id: $(cat "$logs/published.txt")"
wait
grep -q '^data: .*hello' "$logs/subscribed.txt" ||
  fail "the subscribe line did not receive the published event ($logs/subscribed.txt)"
