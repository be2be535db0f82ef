#!/usr/bin/env bash
# Failover of two flowgate instances, for real, in network namespaces (issue 15,
# docs/deploy.md "Measured failover"): the shipped configs in config/keepalived and
# config/bird, with this run's addresses, around the flowgate binary.
#
#   scripts/ha-test.sh [vrrp|bgp|all]     (root; keepalived, bird2, curl, python3)
#
# vrrp: namespaces client, lb1, lb2, backends on one bridge; keepalived and flowgate
#   in lb1 and lb2. A client loop of short requests to the VIP runs while lb1's
#   flowgate is killed (SIGKILL); lb1 comes back and, nopreempt, lb2 keeps the VIP;
#   then lb2's flowgate is stopped and the VIP fails back to lb1. Last, keepalived in
#   lb2 is killed and lb2's flowgate must still serve.
# bgp: a router namespace running BIRD with two BGP peers, lb1 and lb2, each running
#   BIRD, flowgate-vip-check.sh and flowgate; the router must install a route to the
#   VIP with two nexthops. lb1's flowgate gets SIGTERM: the route is withdrawn and
#   every new connection must go to lb2. Last, BIRD in lb2 is killed: the router
#   must drop its route, and lb2's flowgate must still serve.
#
# Figures are printed as "FIGURE name=value" lines (tests/ha_failover.rs reads them);
# a failed check prints "FAIL: ..." and the exit status is 1. Everything this run
# creates (namespaces named $HA_PREFIX-*, processes in them, a scratch directory) is
# removed on exit, whatever the exit.
#
# Environment: FLOWGATE (the binary; default target/debug/flowgate), HA_PREFIX
# (namespace name prefix; default fgha<pid>), HA_KEEP=1 keeps the scratch directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FLOWGATE=$(realpath "${FLOWGATE:-target/debug/flowgate}")
P=${HA_PREFIX:-fgha$$}
WHAT=${1:-all}
W=$(mktemp -d "/tmp/$P.XXXXXX")
FAILED=0
CLIENT=$ROOT/scripts/ha_client.py
PORT=80          # the VIP's port
DIRECT=8080      # each instance's own address (the "keepalived/BIRD died" check)
BACKEND_PORT=8000

cleanup() {
    set +e
    touch "$W/stop"
    local ns pids
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-"); do
        pids=$(ip netns pids "$ns")
        [ -n "$pids" ] && kill $pids 2>/dev/null
    done
    sleep 0.3
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-"); do
        pids=$(ip netns pids "$ns")
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null
        ip netns del "$ns"
    done
    if [ "${HA_KEEP:-0}" = 1 ]; then
        echo "scratch directory kept: $W"
    else
        rm -rf "$W"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
# Whoever reads our output may go away (tests/ha_failover.rs killed): a write then
# fails, set -e ends the script, and the EXIT trap still cleans up.
trap '' PIPE

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }
fail() {
    echo "FAIL: $*"
    FAILED=1
}
figure() { echo "FIGURE $1=$2"; }
# wait_for SECONDS COMMAND...: polls every 0.1 s; 1 if it never held.
wait_for() {
    local limit=$1
    shift
    local end
    end=$(calc "$(now) + $limit")
    until "$@" >/dev/null 2>&1; do
        if awk "BEGIN { exit !($(now) > $end) }"; then return 1; fi
        sleep 0.1
    done
}
# field KEY "k=v k=v ...": the value of KEY.
field() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }
analyze() { python3 "$CLIENT" analyze "$@"; }

add_ns() { ip netns add "$P-$1" && ip -n "$P-$1" link set lo up; }
# veth NS_A IF_A NS_B IF_B: a link between two namespaces.
veth() {
    ip link add name "$2" netns "$P-$1" type veth peer name "$4" netns "$P-$3"
    ip -n "$P-$1" link set "$2" up
    ip -n "$P-$3" link set "$4" up
}
inns() {
    local ns=$1
    shift
    ip netns exec "$P-$ns" "$@"
}
# start NS NAME COMMAND...: runs COMMAND in the background in NS, logged to $W/NAME.log.
start() {
    local ns=$1 name=$2
    shift 2
    ip netns exec "$P-$ns" "$@" >"$W/$name.log" 2>&1 &
    echo $! >"$W/$name.pid"
    disown # killing it is part of the test: no "Killed" notice from bash
}
pid_of() { cat "$W/$1.pid"; }
healthy() { inns "$1" curl -fsS -o /dev/null --max-time 1 http://127.0.0.1:9090/healthz; }

# flowgate_conf VIP_BIND DIRECT_BIND BACKEND UPGRADE_SOCKET: one pool, two
# listeners. Each instance has its own upgrade socket: the path is the
# single-instance lock, and network namespaces do not separate file paths.
flowgate_conf() {
    cat <<EOF
[runtime]
workers = 1
shutdown_timeout = "2s"
# On SIGTERM, /healthz turns 503 while flowgate keeps accepting for 3 s: the
# keepalived or BIRD check (1 s) moves the address away first, so a planned stop
# refuses nobody.
shutdown_delay = "3s"
upgrade_socket = "$4"

[admin]
bind = "127.0.0.1:9090"

[log]
access_log = "off"

[[listeners]]
name = "vip"
bind = "$1"
pool = "web"
connect_timeout = "1s"

[[listeners]]
name = "direct"
bind = "$2"
pool = "web"
connect_timeout = "1s"

[[pools]]
name = "web"
algorithm = "round-robin"
backends = [ { address = "$3" } ]
EOF
}
start_flowgate() { # NS CONFIG
    start "$1" "flowgate-$1" "$FLOWGATE" run --config "$2"
    wait_for 20 healthy "$1" || fail "flowgate in $1 never answered /healthz 200"
}
# A request from the client namespace straight to ADDR:PORT; prints the answer.
direct_ok() { inns "$1" python3 -c "
import sys; sys.path.insert(0, '$ROOT/scripts'); import ha_client
r, what = ha_client.attempt('$2', $3); print(what); sys.exit(r != 'ok')"; }
# client_window FROM TO TARGET: figures for the client loop's attempts in that window.
client_window() { analyze "$W/client.log" "$1" "$2" "$3"; }
first_ok_through() { # FROM TARGET: holds once a request through TARGET succeeded after FROM
    [ "$(field first_ok_s "$(client_window "$1" "$(now)" "$2")")" != none ]
}

# vrrp_failover WHAT SIGNAL NS TARGET NAME: stops flowgate in NS with SIGNAL, then
# measures the gap until a request is answered through TARGET, and the failures.
vrrp_failover() {
    local what=$1 signal=$2 ns=$3 target=$4 name=$5 t f
    t=$(now)
    kill "-$signal" "$(pid_of "flowgate-$ns")"
    wait_for 30 first_ok_through "$t" "$target" || fail "no request through $target within 30 s ($what)"
    sleep 3
    f=$(client_window "$t" "$(now)" "$target")
    echo "$what: $f"
    figure "${name}_gap_s" "$(field first_ok_s "$f")"
    figure "${name}_failed_in_gap" "$(field failed "$f")"
    figure "${name}_failed_after_gap" "$(field failed_after_first_ok "$f")"
    [ "$(field failed_after_first_ok "$f")" = 0 ] || fail "requests failed after the gap ($what)"
    [ "$(field other_after_first_ok "$f")" = 0 ] || fail "requests through the stopped instance after the gap ($what)"
}

vrrp() {
    echo "== VRRP: keepalived + flowgate in lb1 and lb2, one VIP"
    local net=10.77.0 vip=10.77.0.100
    add_ns v-sw
    ip -n "$P-v-sw" link add br0 type bridge
    ip -n "$P-v-sw" link set br0 up
    local host i=0
    for host in v-client v-lb1 v-lb2 v-be; do
        i=$((i + 1))
        add_ns "$host"
        veth v-sw "p$i" "$host" eth0
        ip -n "$P-v-sw" link set "p$i" master br0
    done
    ip -n "$P-v-lb1" addr add $net.1/24 dev eth0
    ip -n "$P-v-lb2" addr add $net.2/24 dev eth0
    ip -n "$P-v-client" addr add $net.10/24 dev eth0
    ip -n "$P-v-be" addr add $net.20/24 dev eth0
    start v-be backend python3 "$CLIENT" serve $BACKEND_PORT

    # The shipped keepalived.conf with this run's VIP (the interface is eth0 here too),
    # written once before either keepalived starts: rewriting it for lb2 truncated the
    # file while lb1's keepalived could be reading it ("no configuration to run").
    sed -e "s|^\$VIP=.*|\$VIP=$vip/24|" config/keepalived/keepalived.conf >"$W/keepalived.conf"
    local lb
    for lb in 1 2; do
        # flowgate listens on the VIP on both instances, before holding it.
        inns "v-lb$lb" sysctl -qw net.ipv4.ip_nonlocal_bind=1
        flowgate_conf "$vip:$PORT" "$net.$lb:$DIRECT" "$net.20:$BACKEND_PORT" "$W/vrrp-lb$lb.sock" >"$W/flowgate-lb$lb.toml"
        start_flowgate "v-lb$lb" "$W/flowgate-lb$lb.toml"
        start "v-lb$lb" "keepalived-lb$lb" keepalived -n -l -D -G -P -i "lb$lb" \
            -f "$W/keepalived.conf" -p "$W/ka-lb$lb.pid" -r "$W/ka-vrrp-lb$lb.pid"
    done
    if ! wait_for 30 bash -c "ip -n $P-v-lb1 -4 addr show eth0 | grep -q ' $vip/'"; then
        fail "lb1 never took the VIP"
        return
    fi
    touch "$W/client.log"
    start v-client client python3 "$CLIENT" loop "$vip:$PORT" "$W/stop" "$W/client.log"
    local t0
    t0=$(now)
    wait_for 30 first_ok_through "$t0" $net.1 || fail "no request through lb1 before the kill"
    sleep 1

    # Failover: lb1's flowgate dies.
    vrrp_failover "failover lb1 -> lb2" KILL v-lb1 $net.2 vrrp

    # lb1 healthy again: with nopreempt the VIP stays on lb2, no request fails. Once
    # lb1's keepalived sees /healthz succeed (after `rise`), a preempting lb1 would
    # take the VIP within 3 adverts and its skew time: watch for 5 s.
    local t_back f ups
    ups=$(grep -c 'flowgate_healthz) succeeded' "$W/keepalived-lb1.log")
    t_back=$(now)
    start_flowgate v-lb1 "$W/flowgate-lb1.toml"
    wait_for 30 bash -c "[ \$(grep -c 'flowgate_healthz) succeeded' $W/keepalived-lb1.log) -gt $ups ]" ||
        fail "lb1's keepalived never saw /healthz succeed again"
    sleep 5
    f=$(client_window "$t_back" "$(now)" $net.2)
    echo "lb1 healthy again (nopreempt): $f"
    figure vrrp_nopreempt_failed "$(field failed "$f")"
    figure vrrp_nopreempt_through_lb1 "$(field ok_other "$f")"
    [ "$(field failed "$f")" = 0 ] || fail "requests failed when lb1 came back"
    [ "$(field ok_other "$f")" = 0 ] || fail "the VIP moved back to lb1 despite nopreempt"

    # Fail back: lb2's flowgate stops (SIGTERM), lb1 takes the VIP again.
    vrrp_failover "fail back lb2 -> lb1" TERM v-lb2 $net.1 vrrp_failback

    # keepalived dies in lb2 (now BACKUP): lb2's flowgate is not affected, nor the VIP.
    # The stopped one first finishes its shutdown (shutdown_delay, then the drain):
    # until it exits it holds the upgrade socket, and a new one refuses to start
    # (a slow machine got there first once).
    local old
    old=$(pid_of flowgate-v-lb2)
    wait_for 20 bash -c "! kill -0 $old 2>/dev/null" || fail "lb2's stopped flowgate never exited"
    start_flowgate v-lb2 "$W/flowgate-lb2.toml"
    local t_ka
    t_ka=$(now)
    kill -9 "$(cat "$W/ka-vrrp-lb2.pid")" "$(pid_of keepalived-lb2)"
    sleep 1
    if kill -0 "$(pid_of flowgate-v-lb2)" && healthy v-lb2 && direct_ok v-client $net.2 $DIRECT >/dev/null; then
        figure vrrp_flowgate_survives_keepalived 1
    else
        figure vrrp_flowgate_survives_keepalived 0
        fail "lb2's flowgate stopped serving when keepalived died"
    fi
    f=$(client_window "$t_ka" "$(now)" $net.1)
    [ "$(field ok_other "$f")" = 0 ] && [ "$(field failed "$f")" = 0 ] ||
        fail "requests to the VIP failed when lb2's keepalived died"
    touch "$W/stop"
}

bgp() {
    echo "== BGP ECMP: BIRD + flowgate in lb1 and lb2, a router with BIRD"
    local vip=10.78.100.100
    add_ns b-rt
    inns b-rt sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1
    local host sub
    for host in b-client:1 b-lb1:11 b-lb2:12 b-be:20; do
        sub=${host#*:}
        host=${host%:*}
        add_ns "$host"
        veth b-rt "to-$host" "$host" eth0
        ip -n "$P-b-rt" addr add "10.78.$sub.1/24" dev "to-$host"
        ip -n "$P-$host" addr add "10.78.$sub.2/24" dev eth0
        ip -n "$P-$host" route add default via "10.78.$sub.1"
    done
    start b-be backend python3 "$CLIENT" serve $BACKEND_PORT

    # The router: a BGP session with each instance, multipath routes into the kernel.
    cat >"$W/bird-rt.conf" <<EOF
log stderr all;
router id 10.78.1.1;
protocol device {
}
protocol kernel {
    ipv4 { export all; };
    merge paths on;           # ECMP: routes from several peers become one multipath route
}
template bgp lb {
    local as 65000;
    connect delay time 1;
    connect retry time 2;
    hold time 9;
    keepalive time 3;
    ipv4 { import all; export none; };
}
protocol bgp lb1 from lb { neighbor 10.78.11.2 as 65001; }
protocol bgp lb2 from lb { neighbor 10.78.12.2 as 65001; }
EOF
    start b-rt bird-rt bird -f -c "$W/bird-rt.conf" -s "$W/bird-rt.ctl" -P "$W/bird-rt.bpid"

    local lb
    for lb in 1 2; do
        ip -n "$P-b-lb$lb" addr add $vip/32 dev lo
        flowgate_conf "$vip:$PORT" "10.78.1$lb.2:$DIRECT" "10.78.20.2:$BACKEND_PORT" "$W/bgp-lb$lb.sock" >"$W/flowgate-lb$lb.toml"
        start_flowgate "b-lb$lb" "$W/flowgate-lb$lb.toml"
        # The shipped bird.conf with this run's addresses, logging to stderr.
        sed -e "s|192\.0\.2\.10/32|$vip/32|" -e "s|198\.51\.100\.11|10.78.1$lb.2|g" \
            -e "s|198\.51\.100\.1 |10.78.1$lb.1 |" -e "s|^log syslog all;|log stderr all;|" \
            config/bird/bird.conf >"$W/bird-lb$lb.conf"
        start "b-lb$lb" "bird-lb$lb" bird -f -c "$W/bird-lb$lb.conf" -s "$W/bird-lb$lb.ctl" -P "$W/bird-lb$lb.bpid"
        start "b-lb$lb" "check-lb$lb" env BIRD_SOCKET="$W/bird-lb$lb.ctl" RISE=1 \
            config/bird/flowgate-vip-check.sh
    done
    local t_start
    t_start=$(now)
    if ! wait_for 30 bash -c "[ \$(ip -n $P-b-rt route show $vip | grep -c nexthop) = 2 ]"; then
        fail "the router never installed a route to the VIP with two nexthops"
        ip -n "$P-b-rt" route show $vip
        return
    fi
    figure bgp_announce_s "$(calc "$(now) - $t_start")"
    echo "router: $(ip -n "$P-b-rt" route show $vip | tr -s ' \n' ' ')"
    figure bgp_nexthops 2

    touch "$W/client.log"
    start b-client client python3 "$CLIENT" loop "$vip:$PORT" "$W/stop" "$W/client.log"
    local t0 f
    t0=$(now)
    sleep 3
    f=$(client_window "$t0" "$(now)" 10.78.11.2)
    echo "before (target lb1): $f"
    figure bgp_before_lb1 "$(field ok_target "$f")"
    figure bgp_before_lb2 "$(field ok_other "$f")"
    figure bgp_before_failed "$(field failed "$f")"
    [ "$(field ok_target "$f")" -gt 0 ] && [ "$(field ok_other "$f")" -gt 0 ] ||
        fail "the router did not spread new connections over both instances"
    [ "$(field failed "$f")" = 0 ] || fail "requests failed before the stop"

    # Stop lb1's flowgate: its check withdraws the route; new flows go to lb2 only.
    local t_term t_gone
    t_term=$(now)
    kill -TERM "$(pid_of flowgate-b-lb1)"
    if ! wait_for 30 bash -c "ip -n $P-b-rt route show $vip | grep -q 'via 10.78.12.2' && [ \$(ip -n $P-b-rt route show $vip | grep -c nexthop) = 0 ]"; then
        fail "the router kept lb1's route for 30 s after the stop"
        return
    fi
    t_gone=$(now)
    figure bgp_withdraw_s "$(calc "$t_gone - $t_term")"
    sleep 4
    f=$(client_window "$t_term" "$(now)" 10.78.12.2)
    echo "after SIGTERM to lb1 (target lb2): $f"
    figure bgp_convergence_s "$(field last_bad_s "$f")"
    figure bgp_failed_in_convergence "$(field failed "$f")"
    # Converged: every request that started after the route was withdrawn went to lb2.
    f=$(client_window "$t_gone" "$(now)" 10.78.12.2)
    local bad
    bad=$(($(field failed "$f") + $(field ok_other "$f")))
    figure bgp_not_lb2_after_withdraw "$bad"
    [ "$bad" = 0 ] || fail "new connections did not all go to lb2 after the route was withdrawn"
    [ "$(field ok_target "$f")" -gt 0 ] || fail "no request reached lb2 after the withdrawal"

    # BIRD dies in lb2: lb2's flowgate is not affected (the router drops the route).
    kill -9 "$(pid_of bird-lb2)"
    sleep 1
    if kill -0 "$(pid_of flowgate-b-lb2)" && healthy b-lb2 && direct_ok b-client 10.78.12.2 $DIRECT >/dev/null; then
        figure bgp_flowgate_survives_bird 1
    else
        figure bgp_flowgate_survives_bird 0
        fail "lb2's flowgate stopped serving when BIRD died"
    fi
    # ... and the router drops lb2's route with the BGP session.
    wait_for 30 bash -c "[ -z \"\$(ip -n $P-b-rt route show $vip)\" ]" ||
        fail "the router kept lb2's route after BIRD in lb2 died"
    touch "$W/stop"
}

for tool in ip keepalived bird birdc curl python3; do
    command -v "$tool" >/dev/null || {
        echo "FAIL: $tool is not installed"
        exit 1
    }
done
[ -x "$FLOWGATE" ] || {
    echo "FAIL: no flowgate binary at $FLOWGATE (cargo build, or set FLOWGATE)"
    exit 1
}
case $WHAT in
vrrp) vrrp ;;
bgp) bgp ;;
all)
    vrrp
    rm -f "$W/stop" "$W/client.log"
    bgp
    ;;
*)
    echo "usage: $0 [vrrp|bgp|all]"
    exit 2
    ;;
esac
if [ "$FAILED" = 1 ]; then
    for log in "$W"/*.log; do
        echo "--- $(basename "$log") (last lines)"
        tail -n 15 "$log"
    done
    exit 1
fi
echo "PASS"
