#!/usr/bin/env bash
# install-deps.sh: the Debian packages vmpod builds and tests with.
# Idempotent: does nothing (no apt-get update) when every package is already installed.
#
#   hack/install-deps.sh            # everything below
set -euo pipefail

PACKAGES=(
  # VM runtime: QEMU (qemu-system-common ships /usr/lib/qemu/virtiofsd), qemu-img, qboot
  qemu-system-x86 qemu-utils
  # guest kernel: Debian's source and what `make` needs to build it
  linux-source-6.1 bc bison flex libelf-dev libssl-dev build-essential cpio xz-utils lz4 zstd
  # guest runc (static, with seccomp) and critest's host-side tools
  libseccomp-dev pkg-config
  # agent API code generation
  protobuf-compiler
  # container networking and the integration tests' host side
  iproute2 iptables util-linux kmod procps psmisc curl ca-certificates iputils-ping
  # busybox for test images (extracted, not installed as the host's busybox)
  dpkg-dev file
  # VM-pod test guest (hack/vm-guest-image.sh): a Debian rootfs, a disk image made without
  # loop devices or mounts (sfdisk, FAT + syslinux, ext4 by mke2fs -d), a cidata seed (ISO or
  # vfat), UEFI firmware and python3 for the boot test's guest-agent and QMP client
  mmdebstrap dosfstools mtools syslinux syslinux-common fdisk e2fsprogs genisoimage ovmf python3
  # hack/qemu-next.sh checks the newer QEMU and virtiofsd against Debian's signed indexes
  gpgv debian-archive-keyring
)

missing=()
for p in "${PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = 'install ok installed' ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
