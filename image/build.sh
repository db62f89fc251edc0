#!/bin/bash
# Builds the scanbox SD card image: Raspberry Pi OS Lite (64-bit, bookworm) made by pi-gen, plus
# this repository's stage (stage-scanbox). pi-gen itself is not changed: the stage is added
# through STAGE_LIST, and stage2's own image is skipped with the SKIP_IMAGES file pi-gen reads.
#
# Where it runs: a Debian 12 (or Raspberry Pi OS) machine, as root, with pi-gen's dependencies
# (https://github.com/RPi-Distro/pi-gen#dependencies; on an x86 machine also qemu-user-static and
# binfmt-support), about 20 GB of disk and network access; 30-60 minutes. pi-gen's Docker build
# does not see a stage outside its own directory, so this uses the native build. Not run in CI.
#
#   sudo SCANBOX_ADMIN_PASS=... image/build.sh            # the image lands in image/build/deploy
#
# Settings (environment):
#   SCANBOX_ADMIN_USER     the login for support (default: technician)
#   SCANBOX_ADMIN_PASS     its password, or
#   SCANBOX_ADMIN_PUBKEY   an SSH public key (then SSH is on and password logins are off)
#   SCANBOX_USB_GADGET=1   the box is also a USB Ethernet adapter for the counter PC (192.168.7.1)
#   SCANBOX_READONLY_ROOT=1  read-only root after the first boot; state on a third partition
#   SCANBOX_DATA_MB        that partition's size in the image (default 256; it grows to fill the
#                          card at first boot)
#   PI_GEN_REF             the pi-gen branch or tag (default arm64: 64-bit Raspberry Pi OS)
#   BUILD_DIR              where pi-gen, the wheel and the image go (default image/build)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "${HERE}")"
BUILD_DIR="${BUILD_DIR:-${HERE}/build}"
PI_GEN_REF="${PI_GEN_REF:-arm64}"
PI_GEN="${BUILD_DIR}/pi-gen"
STAGE="${HERE}/stage-scanbox"

die() { echo "image/build.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "pi-gen needs root (it mounts, chroots and makes devices)"
[ -n "${SCANBOX_ADMIN_PASS:-}${SCANBOX_ADMIN_PUBKEY:-}" ] || \
	die "set SCANBOX_ADMIN_PASS or SCANBOX_ADMIN_PUBKEY: a box nobody can log in to cannot be supported"

mkdir -p "${BUILD_DIR}"
if [ ! -d "${PI_GEN}/.git" ]; then
	git clone --depth 1 --branch "${PI_GEN_REF}" https://github.com/RPi-Distro/pi-gen.git "${PI_GEN}"
fi

# scanbox as a wheel; its dependencies come from PyPI inside the image (aarch64 wheels)
export SCANBOX_SRC="${REPO}"
export SCANBOX_DIST="${BUILD_DIR}/dist"
rm -rf "${SCANBOX_DIST}"
python3 -m pip wheel --no-deps --wheel-dir "${SCANBOX_DIST}" "${REPO}"
export SCANBOX_USB_GADGET="${SCANBOX_USB_GADGET:-0}"
export SCANBOX_READONLY_ROOT="${SCANBOX_READONLY_ROOT:-0}"

# the read-only variant gets its data partition after pi-gen: keep the image uncompressed
compression=xz
[ "${SCANBOX_READONLY_ROOT}" = "1" ] && compression=none

{
	echo "IMG_NAME=scanbox"
	echo "RELEASE=bookworm"
	echo "DEPLOY_DIR=${BUILD_DIR}/deploy"
	echo "DEPLOY_COMPRESSION=${compression}"
	echo "TARGET_HOSTNAME=scanbox"
	echo "TIMEZONE_DEFAULT=Asia/Shanghai"
	echo "LOCALE_DEFAULT=en_US.UTF-8"
	echo "KEYBOARD_KEYMAP=us"
	echo "KEYBOARD_LAYOUT='English (US)'"
	echo "WPA_COUNTRY=CN"
	echo "FIRST_USER_NAME=${SCANBOX_ADMIN_USER:-technician}"
	echo "DISABLE_FIRST_BOOT_USER_RENAME=1"
	if [ -n "${SCANBOX_ADMIN_PUBKEY:-}" ]; then
		echo "ENABLE_SSH=1"
		echo "PUBKEY_SSH_FIRST_USER='${SCANBOX_ADMIN_PUBKEY}'"
		echo "PUBKEY_ONLY_SSH=1"
	else
		echo "ENABLE_SSH=0"
	fi
	echo "STAGE_LIST='stage0 stage1 stage2 ${STAGE}'"
} > "${BUILD_DIR}/config"
# the password is not written to a file that outlives the build
export FIRST_USER_PASS="${SCANBOX_ADMIN_PASS:-}"

touch "${PI_GEN}/stage2/SKIP_IMAGES"  # only the scanbox image, not plain Lite
(cd "${PI_GEN}" && ./build.sh -c "${BUILD_DIR}/config")

image="$(find "${BUILD_DIR}/deploy" -maxdepth 1 -name '*scanbox*.img' -printf '%T@ %p\n' 2>/dev/null \
	| sort -rn | head -n 1 | cut -d' ' -f2- || true)"
if [ "${SCANBOX_READONLY_ROOT}" = "1" ]; then
	[ -n "${image}" ] || die "pi-gen made no image in ${BUILD_DIR}/deploy"
	add_data_partition() {
		local img="$1" loop
		truncate --size "+${SCANBOX_DATA_MB:-256}M" "${img}"
		echo ',,83' | sfdisk --append --no-reread "${img}"
		loop="$(losetup --find --show --partscan "${img}")"
		trap 'umount "${BUILD_DIR}/data" 2>/dev/null || true; losetup -d "${loop}"; trap - RETURN' RETURN
		mkfs.ext4 -q -L scanbox-data "${loop}p3"
		mkdir -p "${BUILD_DIR}/data"
		mount "${loop}p3" "${BUILD_DIR}/data"
		install -d -m 755 "${BUILD_DIR}/data/etc-scanbox"
		install -d -m 700 "${BUILD_DIR}/data/state"
		install -d -m 2755 "${BUILD_DIR}/data/journal"
		umount "${BUILD_DIR}/data"
	}
	add_data_partition "${image}"
	xz -T0 -f "${image}"
	image="${image}.xz"
fi
echo "image: ${image:-see ${BUILD_DIR}/deploy}"
echo "flash it (Raspberry Pi Imager, or: xzcat IMAGE | dd of=/dev/sdX bs=4M conv=fsync), then docs/technician.md"
