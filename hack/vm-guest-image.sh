#!/usr/bin/env bash
# vm-guest-image.sh: a small real Debian bookworm guest for the VM-pod tests (a pod that is a
# whole guest OS booted from a disk image). Debian's kernel + systemd, with:
#   - cloud-init, NoCloud only: a `cidata` ISO or a `CIDATA` vfat disk. Without network-config
#     its fallback config brings eth0 up by DHCP through ifupdown (net.ifnames=0: the NIC is eth0);
#   - qemu-guest-agent, started early: it answers before cloud-init is done, so a test polls for
#     cloud-init's effects (or /var/lib/cloud/instance/boot-finished), never takes ping as done;
#   - a login prompt on the serial console ttyS0; pvpanic, so a guest panic reaches QEMU;
#   - no ssh server and no passwords.
# The initramfs (MODULES=list) carries virtio_pci/blk/scsi/net, sd_mod, ahci, sr_mod and ext4:
# the disks may be virtio, SCSI or SATA, the seed a cdrom.
#
# The kernel is linux-image-amd64, not linux-image-cloud-amd64: the cloud flavour has no AHCI
# (so no disk or cdrom on q35's SATA, where vmpod puts cdroms by default), no e1000/e1000e, no
# bochs or virtio-gpu and no USB host drivers. Driver trees a QEMU guest never needs (sound,
# media, wireless, most NICs and GPUs, infiniband, FC HBAs, ...) are left out by dpkg
# path-excludes: 192 MB of modules instead of 400 MB (the cloud kernel has 105 MB).
#
# Disk (MBR, 1088 MiB): p1 FAT16 "BOOT" with the kernel and initrd, syslinux for BIOS and
# Debian's signed shim + GRUB as \EFI\BOOT\BOOTX64.EFI for UEFI (with secure boot too);
# p2 ext4 LABEL=rootfs. Only Debian packages
# (hack/install-deps.sh): mmdebstrap in unshare mode (its /proc and /sys mounts stay in its own
# mount namespace), then mkfs.fat, mtools, syslinux and `mke2fs -d` write the filesystems at
# byte offsets into the image file: no loop devices, no mounts.
#
# Outputs, in the cache directory printed on stdout:
#   disk.qcow2  compressed qcow2: the containerDisk payload
#   disk.raw    the same disk, raw and sparse (a PVC's disk.img, block-device tests);
#               copy it with `cp --sparse=always`
#   INFO        kernel release, cloud-init and qemu-guest-agent versions, sizes
#
# Cached under $VMPOD_CACHE/vm-guest/<ISO week>-<hash of this script>. The week
# (`date -u +%G-W%V`) is in the key so that the first run of a week rebuilds from the mirror
# and picks up security updates; that run removes the earlier weeks' images. The guest's apt
# sources are the host's (/etc/apt/sources.list.d/debian.sources, else /etc/apt/sources.list):
# no mirror is named here. Needs root. hack/vm-guest-boot-test.sh boots the image and checks it.
#
# Cold build on 2 shared cores: 75 s when they are idle, up to about 150 s when they are busy
# (mmdebstrap 50-110 s, partitions and filesystems 3 s, qcow2 15 s). A cache hit takes a second.
#
# --nested: the same guest plus Debian's qemu-system-x86 and busybox-static, cached apart
# (vm-guest-nested/): the L1 host of the nested VFIO proof (integration/nestedvfio), which
# runs vmpod's machine layer inside it and builds its L2's initramfs from busybox-static.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

FLAVOUR=
case ${1:-} in
  "") ;;
  --nested) FLAVOUR=nested ;;
  *) die "usage: $0 [--nested]" ;;
esac

"$VMPOD_ROOT/hack/install-deps.sh" >&2
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap writes a root-owned tree)"

WEEK=$(date -u +%G-W%V)
BASE=$VMPOD_CACHE/vm-guest${FLAVOUR:+-$FLAVOUR}
OUT=$BASE/$WEEK-$( (cat "$0"; echo "$FLAVOUR") | hash_of)
if [ -f "$OUT/INFO" ]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

SOURCES=
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
  if [ -s "$f" ]; then SOURCES=$f; break; fi
done
[ -n "$SOURCES" ] || die "no apt sources on this host (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list)"

PKGS=linux-image-amd64,systemd-sysv,udev,dbus,hostname,e2fsprogs,cloud-init,qemu-guest-agent
PKGS+=,ifupdown,isc-dhcp-client,iproute2
if [ "$FLAVOUR" = nested ]; then PKGS+=,qemu-system-x86,busybox-static,kmod; fi
CMDLINE="root=LABEL=rootfs ro console=ttyS0,115200 net.ifnames=0"
# the kernel's module trees left out (dpkg filters; a later path-include wins)
KMOD=/lib/modules/*/kernel
DPKG_FILTERS=(path-exclude=/usr/share/man/* path-exclude=/usr/share/locale/*
  path-include=/usr/share/locale/locale.alias
  path-exclude=/usr/share/doc/* path-include=/usr/share/doc/*/copyright)
for d in sound drivers/media drivers/net/wireless drivers/net/ethernet drivers/net/can \
         drivers/net/usb drivers/gpu/drm/amd drivers/gpu/drm/i915 drivers/gpu/drm/nouveau \
         drivers/gpu/drm/radeon drivers/infiniband drivers/iio drivers/staging drivers/comedi \
         drivers/isdn drivers/bluetooth net/bluetooth net/wireless net/mac80211 drivers/scsi/lpfc \
         drivers/scsi/qla2xxx drivers/scsi/bfa drivers/scsi/qla4xxx drivers/scsi/mpt3sas; do
  DPKG_FILTERS+=("path-exclude=$KMOD/$d/*")
done
# QEMU's Intel NIC models: e1000 (also vmpod's "e1000"), e1000e, igb
for d in e1000 e1000e igb; do DPKG_FILTERS+=("path-include=$KMOD/drivers/net/ethernet/intel/$d/*"); done
# MBR layout in 512-byte sectors: p1 at 1 MiB, 64 MiB; p2 from 65 MiB to the end
DISK_MB=1088
P1_START=2048 P1_SECTORS=$((64 * 2048))
P2_START=$((P1_START + P1_SECTORS))
P2_SECTORS=$((DISK_MB * 2048 - P2_START))

mkdir -p "$BASE/debs"
# leftovers of a build that was killed (SIGKILL skips the trap); a day old, so not a live one
find "$BASE" -maxdepth 1 -name '.build.*' -mmin +1440 -exec rm -rf --one-file-system {} +
# the work directory is on the cache's filesystem: publish is a rename, disk.raw stays sparse
W=$(mktemp -d "$BASE/.build.XXXXXX")
trap 'rm -rf --one-file-system "$W"' EXIT
R=$W/rootfs
mkdir -p "$W/out" "$W/hooks"

# The UEFI boot chain, as Debian's installer sets it up for secure boot: shim (signed by
# Microsoft, carrying Debian's key) loads GRUB (signed by Debian), which loads the signed
# kernel. From the packages, not installed on the host; the .debs are cached.
# fetch_deb PACKAGE: the package's .deb in $BASE/debs, downloaded if missing; sets DEB, VERSION
fetch_deb() {
  local pkg=$1
  VERSION=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
  [ -n "$VERSION" ] && [ "$VERSION" != "(none)" ] || die "apt knows no $pkg package: run apt-get update"
  DEB=$BASE/debs/${pkg}_${VERSION#*:}_amd64.deb
  [ -f "$DEB" ] && return
  log "downloading $pkg $VERSION"
  rm -rf "$W/deb"; mkdir "$W/deb"
  # a stale package list names a version the mirror no longer has: update once and retry
  # as root: the _apt user cannot reach a cache under root's home
  if ! (cd "$W/deb" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$VERSION" >/dev/null); then
    apt-get update -qq
    VERSION=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
    DEB=$BASE/debs/${pkg}_${VERSION#*:}_amd64.deb
    (cd "$W/deb" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$VERSION" >/dev/null)
  fi
  find "$BASE/debs" -name "${pkg}_*.deb" -delete
  mv "$W"/deb/"${pkg}"_*.deb "$DEB"
}
fetch_deb shim-signed
SHIM_VERSION=$VERSION
dpkg-deb -x "$DEB" "$W/efi"
fetch_deb grub-efi-amd64-signed
GRUB_VERSION=$VERSION
dpkg-deb -x "$DEB" "$W/efi"
SHIM_EFI=$W/efi/usr/lib/shim/shimx64.efi.signed
GRUB_EFI=$W/efi/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed
for f in "$SHIM_EFI" "$GRUB_EFI"; do [ -f "$f" ] || die "no ${f#"$W"/efi} in the packages"; done

# Before the kernel is installed: a MODULES=list initramfs, so the kernel's postinst builds one
# small initrd (MODULES=most would make it several times bigger), once.
cat > "$W/hooks/essential.sh" <<'EOF'
#!/bin/sh
set -e
R=$1
mkdir -p "$R/etc/initramfs-tools/conf.d" "$R/usr/share/initramfs-tools/modules.d"
echo MODULES=list > "$R/etc/initramfs-tools/conf.d/vmpod.conf"
# ext4 and crc32c are modules in this kernel, and MODULES=list adds only what it is told
printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod ahci sr_mod virtio_net ext4 crc32c_generic \
  > "$R/usr/share/initramfs-tools/modules.d/vmpod"
EOF

# The guest's configuration.
cat > "$W/hooks/customize.sh" <<'EOF'
#!/bin/sh
set -e
R=$1
echo localhost > "$R/etc/hostname"                    # cloud-init sets the real one
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
rm -f "$R/etc/resolv.conf"; : > "$R/etc/resolv.conf"  # not the build host's; dhclient writes it
: > "$R/etc/machine-id"                               # each VM makes its own at boot
echo 'LABEL=rootfs  /  ext4  defaults,errors=remount-ro  0 1' > "$R/etc/fstab"
# cloud-init's fallback network config (eth0 by DHCP) is rendered to interfaces.d
printf 'auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n' > "$R/etc/network/interfaces"

# cloud-init: NoCloud only (cidata ISO or CIDATA vfat), and only the modules a test needs:
# each costs Python time under TCG, and those needing what a minimal rootfs lacks (ssh, locale,
# growpart) would fail and leave the system degraded.
cat > "$R/etc/cloud/cloud.cfg.d/90-vmpod-datasource.cfg" <<'CC'
datasource_list: [ NoCloud, None ]
CC
cat > "$R/etc/cloud/cloud.cfg.d/95-vmpod-modules.cfg" <<'CC'
# the default user without the groups a minimal rootfs lacks (sudo, netdev, ...); no password
system_info:
  default_user: {name: debian, lock_passwd: true, gecos: Debian, groups: [adm], shell: /bin/bash}
cloud_init_modules: [seed_random, bootcmd, write_files, set_hostname, update_hostname, update_etc_hosts, users_groups]
cloud_config_modules: [runcmd]
cloud_final_modules: [scripts_per_once, scripts_per_boot, scripts_per_instance, scripts_user, final_message, power_state_change]
CC

# qemu-guest-agent: start as soon as its virtio port exists, not after basic.target (which waits
# for cloud-init-local): the agent answers after ~25 s instead of ~65 s under TCG.
mkdir -p "$R/etc/systemd/system/qemu-guest-agent.service.d"
cat > "$R/etc/systemd/system/qemu-guest-agent.service.d/early.conf" <<'QG'
[Unit]
DefaultDependencies=no
After=local-fs.target
Conflicts=shutdown.target
Before=shutdown.target
QG

# TCG's default CPU model advertises SVM: the guest would load kvm_amd (and powernow_k8) for nothing
printf 'blacklist %s\n' kvm kvm_amd kvm_intel powernow_k8 pcspkr > "$R/etc/modprobe.d/vmpod-blacklist.conf"
for u in e2scrub_reap.service systemd-binfmt.service apt-daily.timer apt-daily-upgrade.timer \
         e2scrub_all.timer fstrim.timer dpkg-db-backup.timer; do
  ln -sf /dev/null "$R/etc/systemd/system/$u"
done
EOF
chmod +x "$W/hooks/"*.sh

log "mmdebstrap bookworm from $SOURCES (about a minute)"
mmdebstrap --mode=unshare --variant=apt --include="$PKGS" \
  --aptopt='Acquire::Languages "none"' \
  "${DPKG_FILTERS[@]/#/--dpkgopt=}" \
  --essential-hook="'$W/hooks/essential.sh' \"\$1\"" \
  --customize-hook="'$W/hooks/customize.sh' \"\$1\"" \
  --customize-hook="chroot \"\$1\" sh -c 'lsinitramfs /boot/initrd.img-*' > '$W/initrd.list'" \
  bookworm "$R" "$SOURCES" >"$W/mmdebstrap.log" 2>&1 || {
    tail -40 "$W/mmdebstrap.log" >&2
    die "mmdebstrap failed"
  }

kernels=("$R"/boot/vmlinuz-*)
[ ${#kernels[@]} = 1 ] && [ -f "${kernels[0]}" ] || die "expected one kernel in $R/boot, found: ${kernels[*]}"
KVER=${kernels[0]##*/vmlinuz-}
[ -f "$R/boot/initrd.img-$KVER" ] || die "no initrd for $KVER"
for m in virtio_pci virtio_blk virtio_scsi sd_mod ahci sr_mod virtio_net ext4 crc32c_generic; do
  grep -E "/$m\.ko" "$W/initrd.list" >/dev/null || die "the initrd lacks $m"
done
pkgver() { dpkg-query --admindir="$R/var/lib/dpkg" -W -f='${Version}' "$1"; }

log "disk image: kernel $KVER, rootfs $(du -sh "$R" | cut -f1)"
IMG=$W/out/disk.raw
truncate -s "${DISK_MB}M" "$IMG"
sfdisk -q "$IMG" <<EOF
label: dos
start=$P1_START, size=$P1_SECTORS, type=c, bootable
start=$P2_START, size=$P2_SECTORS, type=83
EOF

# p1: FAT16 at its byte offset (mkfs.fat warns "block count mismatch" on a whole-disk file: expected)
mkfs_out=$(mkfs.fat -F 16 -n BOOT --offset "$P1_START" "$IMG" $((P1_SECTORS / 2)) 2>&1) ||
  die "mkfs.fat: $mkfs_out"
export MTOOLS_SKIP_CHECK=1
P1="$IMG@@$((P1_START * 512))"
mcopy -i "$P1" "$R/boot/vmlinuz-$KVER" ::vmlinuz
mcopy -i "$P1" "$R/boot/initrd.img-$KVER" ::initrd.img
# BIOS: syslinux's mtools installer writes into the FAT at a byte offset; mbr.bin chains to p1
printf 'SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND %s\n' \
  "$CMDLINE" > "$W/syslinux.cfg"
mcopy -i "$P1" "$W/syslinux.cfg" ::syslinux.cfg
syslinux --install --offset $((P1_START * 512)) "$IMG"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$IMG" bs=440 count=1 conv=notrunc status=none
# UEFI: shim as the removable-media loader, GRUB next to it; GRUB's built-in config reads
# grub.cfg from /EFI/debian (its prefix) or else from its own directory: both have it. The
# kernel and initrd are the FAT partition's (GRUB's root is the partition it came from).
mmd -i "$P1" ::EFI ::EFI/BOOT ::EFI/debian
mcopy -i "$P1" "$SHIM_EFI" ::EFI/BOOT/BOOTX64.EFI
mcopy -i "$P1" "$GRUB_EFI" ::EFI/BOOT/grubx64.efi
printf 'serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\nset timeout=0\nmenuentry "Debian (vmpod test guest)" {\n  linux /vmlinuz %s\n  initrd /initrd.img\n}\n' "$CMDLINE" > "$W/grub.cfg"
mcopy -i "$P1" "$W/grub.cfg" ::EFI/BOOT/grub.cfg
mcopy -i "$P1" "$W/grub.cfg" ::EFI/debian/grub.cfg
# p2: ext4 filled from the directory, at its byte offset. The size is given with its unit: a
# bare number is KiB, not filesystem blocks.
mke2fs -q -t ext4 -L rootfs -d "$R" -E offset=$((P2_START * 512)) "$IMG" "$((P2_SECTORS / 2))k"

log "qcow2 (compressed, about 15 s)"
qemu-img convert -c -O qcow2 "$IMG" "$W/out/disk.qcow2"

cat > "$W/out/INFO" <<EOF
built=$(date -u +%FT%TZ)
flavour=${FLAVOUR:-default}
week=$WEEK
kernel=$KVER
linux-image-amd64=$(pkgver linux-image-amd64)
systemd=$(pkgver systemd)
cloud-init=$(pkgver cloud-init)
qemu-guest-agent=$(pkgver qemu-guest-agent)
shim-signed=$SHIM_VERSION
grub-efi-amd64-signed=$GRUB_VERSION
cmdline=$CMDLINE
rootfs_kib=$(du -sk "$R" | cut -f1)
initrd_bytes=$(stat -c %s "$R/boot/initrd.img-$KVER")
disk.raw_bytes=$(stat -c %s "$IMG")
disk.raw_allocated_kib=$(du -k "$IMG" | cut -f1)
disk.qcow2_bytes=$(stat -c %s "$W/out/disk.qcow2")
EOF

publish "$W/out" "$OUT"
# earlier weeks' images: superseded by this one
for d in "$BASE"/[0-9][0-9][0-9][0-9]-W[0-9][0-9]-*; do
  case ${d##*/} in "$WEEK"-*) continue ;; esac
  if [ -d "$d" ]; then rm -rf --one-file-system "$d"; fi
done
log "built $OUT: $(tr '\n' ' ' < "$OUT/INFO")"
echo "$OUT"
