#!/bin/sh
# udhcpc's event script in the L2 guest: report and configure the lease.
case $1 in
  bound|renew)
    echo "L2-DHCP lease $ip/$mask from $serverid, router $router"
    ip addr add "$ip/$mask" dev "$interface" ;;
esac
