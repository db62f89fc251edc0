#!/bin/bash -e
[ "${SCANBOX_READONLY_ROOT:-0}" = "1" ] || exit 0
# overlayroot: the initramfs part of raspi-config's "overlay file system"; growpart: cloud-guest-utils
apt-get install -y --no-install-recommends overlayroot cloud-guest-utils
systemctl enable scanbox-grow-data.service scanbox-readonly.service
