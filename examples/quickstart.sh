#!/usr/bin/env bash
# The quickstart: a vipr node in its own network namespace, two vipr-netexec
# pods behind a ClusterIP service, a client pod calling it by address and by
# name. Everything is removed on exit. Run through `cargo xtask run`, which
# builds first; KEEP=1 leaves the node running for you to explore.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/debug"
id="vq$$"
node="$id-node"
state="/tmp/vipr-quickstart-$id"
export VIPR_SOCKET="$state/vipr.sock"
agent_args=(agent --state-dir "$state/state" --node-name "$id" --uplink "${id}u"
            --cgroup-root "/sys/fs/cgroup/unified/vipr-$id" --api-socket "$VIPR_SOCKET")

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }
vipr() { "$bin/vipr" "$@"; }

cleanup() {
  set +e
  [[ -n "${agent_pid:-}" ]] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  nsenter --net="/run/netns/$node" "$bin/vipr" "${agent_args[@]}" --cleanup >/dev/null 2>&1
  ip netns del "$node" 2>/dev/null
  ip netns del "$id-out" 2>/dev/null
  rm -rf "$state"
}

step "a node namespace with an uplink to an outside namespace"
mkdir -p "$state"
ip netns add "$node"
ip netns add "$id-out"
trap cleanup EXIT
ip -n "$node" link set lo up
ip -n "$node" link add "${id}u" type veth peer name "${id}o" netns "$id-out"
ip -n "$node" addr add 172.31.255.2/24 dev "${id}u"
ip -n "$node" link set "${id}u" up
ip -n "$id-out" addr add 172.31.255.1/24 dev "${id}o"
ip -n "$id-out" link set "${id}o" up

step "vipr agent (logs in $state/agent.log)"
nsenter --net="/run/netns/$node" "$bin/vipr" "${agent_args[@]}" >"$state/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 100); do vipr get ns >/dev/null 2>&1 && break; sleep 0.1; done
show vipr get ns

step "two netexec pods behind a service, and a client pod"
show vipr apply -f "$root/examples/hello.yaml"
cat <<'YAML' | vipr apply -f -
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers: [{name: shell, image: host, command: [sleep, "3600"]}]
YAML
for _ in $(seq 300); do
  ready=$(vipr get pods | awk 'NR>1 && $2=="1/1"' | wc -l)
  [[ $ready -eq 3 ]] && break
  sleep 0.1
done
show vipr get pods -o wide
show vipr get svc -A
show vipr get endpointslices

vip=$(vipr get svc hello -o json | sed -n 's/.*"clusterIP": "\(.*\)".*/\1/p')
step "the client calls the ClusterIP $vip: the node picks a backend per connection"
for _ in 1 2 3 4 5 6; do
  printf '$ vipr exec client -- curl -s http://%s/hostname  ->  ' "$vip"
  vipr exec client -- curl -s -m 2 "http://$vip/hostname"; echo
done

step "by name, through the cluster DNS and the pod's search path"
show vipr exec client -- getent hosts hello
printf '$ vipr exec client -- curl -s http://hello/clientip  ->  '
vipr exec client -- curl -s -m 2 http://hello/clientip; echo

step "from the node itself (pods and node processes under --cgroup-root are translated at connect(); XDP translates what arrives from elsewhere)"
shell_cg="/sys/fs/cgroup/unified/vipr-$id/node-shell"
mkdir -p "$shell_cg"
printf '$ curl -s http://%s/hostname  (a node process)  ->  ' "$vip"
nsenter --net="/run/netns/$node" sh -c "echo \$\$ > $shell_cg/cgroup.procs; exec curl -s -m 2 http://$vip/hostname"; echo
rmdir "$shell_cg"

step "UDP through the same service"
printf '$ echo hostname | nc -u -w1 %s 81  ->  ' "$vip"
vipr exec client -- sh -c "echo hostname | nc -u -w1 $vip 81"; echo

step "from outside the node, through the NodePort (externalTrafficPolicy Cluster: the pod sees the node's address)"
printf '$ curl -s http://172.31.255.2:30080/clientip  (from the outside namespace)  ->  '
ip netns exec "$id-out" curl -s -m 2 http://172.31.255.2:30080/clientip; echo

step "why a request went where it went"
show vipr service list
show vipr trace --src 172.31.255.1:40000 --dst 172.31.255.2:30080

if [[ "${KEEP:-}" == 1 ]]; then
  step "the node keeps running: VIPR_SOCKET=$VIPR_SOCKET $bin/vipr get pods; Ctrl-C removes it"
  trap 'exit 0' INT
  wait "$agent_pid"
fi
step "done; removing the node"
