#!/bin/bash -e
# The boot partition is FAT: no owners, no modes; the mount gives every file the same ones, and
# pi-gen's "defaults" let every user read it. Root only: the technician's scanbox.toml holds the
# platform password and the API tokens until provisioning (a failed file keeps its settings,
# with its secrets blanked: agent/provision.py).
fstab="${ROOTFS_DIR}/etc/fstab"
if ! grep -Eq '^[^#[:space:]]+[[:space:]]+/boot/firmware[[:space:]]+vfat[[:space:]]+[^[:space:]]*fmask=0177' "${fstab}"; then
	sed -i -E 's#^([^#[:space:]]+[[:space:]]+/boot/firmware[[:space:]]+vfat[[:space:]]+)([^[:space:]]+)#\1\2,uid=0,gid=0,fmask=0177,dmask=0077#' "${fstab}"
fi
# a line that did not match (pi-gen changed its fstab) must not pass silently
grep -Eq '^[^#[:space:]]+[[:space:]]+/boot/firmware[[:space:]]+vfat[[:space:]]+[^[:space:]]*,uid=0,gid=0,fmask=0177,dmask=0077' "${fstab}"
