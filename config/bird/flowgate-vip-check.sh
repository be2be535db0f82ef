#!/bin/sh
# Announce flowgate's VIP over BGP while /healthz answers 200 (config/bird/bird.conf,
# docs/deploy.md "BGP ECMP"). Runs in the foreground next to BIRD and flowgate:
# every INTERVAL seconds it checks /healthz and sets the BIRD protocol that holds
# the VIP route to enabled (after RISE good checks in a row) or disabled (after FALL
# failed ones). It repeats the birdc command every round, so a restarted BIRD (which
# starts with the protocol disabled) is put right within one interval.
#
# Environment (defaults in brackets):
#   FLOWGATE_HEALTHZ  [http://127.0.0.1:9090/healthz]
#   BIRD_SOCKET       [/run/bird/bird.ctl]
#   BIRD_PROTOCOL     [flowgate_vip]
#   INTERVAL [1]  FALL [1]  RISE [2]
set -u
url=${FLOWGATE_HEALTHZ:-http://127.0.0.1:9090/healthz}
sock=${BIRD_SOCKET:-/run/bird/bird.ctl}
proto=${BIRD_PROTOCOL:-flowgate_vip}
interval=${INTERVAL:-1}
fall=${FALL:-1}
rise=${RISE:-2}

want=disable
good=0
bad=0
while :; do
    if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then
        good=$((good + 1))
        bad=0
    else
        bad=$((bad + 1))
        good=0
    fi
    was=$want
    [ "$good" -ge "$rise" ] && want=enable
    [ "$bad" -ge "$fall" ] && want=disable
    [ "$want" != "$was" ] && echo "flowgate-vip-check: $url $([ "$want" = enable ] && echo healthy || echo unhealthy): ${want} $proto"
    birdc -s "$sock" "$want" "$proto" >/dev/null 2>&1 ||
        echo "flowgate-vip-check: birdc -s $sock $want $proto failed (BIRD not running?)"
    sleep "$interval"
done
