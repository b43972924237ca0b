#!/bin/sh
# The L1 guest's part of the nested VFIO proof (cloud-init runcmd, as root). Output goes to
# the second serial port, which the test reads; the L1 powers off at the end either way.
exec >/dev/ttyS1 2>&1
trap 'echo "L1-EXIT $rc"; sync; poweroff' EXIT
rc=1
set -eu
P=/mnt/payload
KVER=$(uname -r)
echo "L1: kernel $KVER, $(nproc) vCPUs, cmdline: $(cat /proc/cmdline)"
echo "L1: IOMMU groups: $(ls /sys/kernel/iommu_groups | wc -l)"
modprobe vfio-pci

# fn VENDOR:DEVICE: the PCI address of the first function with that ID
fn() {
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor"):$(cat "$d/device")" = "$1" ]; then echo "${d##*/}"; return; fi
  done
  echo "L1: no PCI function $1" >&2; return 1
}
EDU=$(fn 0x1234:0x11e8)
NIC=$(fn 0x8086:0x10d3)
for a in "$EDU" "$NIC"; do
  echo "L1: $a $(cat /sys/bus/pci/devices/$a/vendor):$(cat /sys/bus/pci/devices/$a/device)" \
    "IOMMU group $(basename "$(readlink /sys/bus/pci/devices/$a/iommu_group)")" \
    "driver $(basename "$(readlink "/sys/bus/pci/devices/$a/driver" || echo none)")"
done

# The device plugin's part for the cold-plugged function: bind it to vfio-pci, which makes
# its group node, the /dev/vfio/N a CDI spec would inject.
echo vfio-pci > "/sys/bus/pci/devices/$EDU/driver_override"
echo "$EDU" > /sys/bus/pci/drivers_probe
GROUP=$(basename "$(readlink "/sys/bus/pci/devices/$EDU/iommu_group")")

# The L2 guest: this kernel, and an initramfs of busybox-static, e1000e with the modules it
# needs (in load order) and the test's init.
R=/tmp/l2root
rm -rf "$R"; mkdir -p "$R/bin" "$R/proc" "$R/sys" "$R/dev" "$R/lib/modules"
cp /bin/busybox "$R/bin/busybox"
modprobe --show-depends e1000e | while read -r cmd ko _; do
  [ "$cmd" = insmod ] || continue
  cp "$ko" "$R/lib/modules/"
  echo "${ko##*/}" >> "$R/lib/modules/order"
done
echo "L1: L2 modules: $(tr '\n' ' ' < "$R/lib/modules/order")"
cp "$P/l2-init" "$R/init"
cp "$P/udhcpc.sh" "$R/bin/udhcpc.sh"
chmod +x "$R/init" "$R/bin/udhcpc.sh"
(cd "$R" && find . | busybox cpio -o -H newc 2>/dev/null) > /tmp/l2.cpio
echo "L1: L2 initramfs $(wc -c < /tmp/l2.cpio) bytes"

set +e
"$P/l1host" -kernel "/boot/vmlinuz-$KVER" -initrd /tmp/l2.cpio \
  -coldplug "/dev/vfio/$GROUP" -hotplug "$NIC" -allow 8086:10d3
rc=$?
echo "L1: L2 QEMU log:"; tail -n 20 /run/l2-qemu.log 2>/dev/null
