#!/bin/bash -e
# Optional (SCANBOX_READONLY_ROOT=1): the root file system becomes read-only (an overlay in RAM)
# after the first boot, and everything that must last lives on a third partition, scanbox-data,
# that image/build.sh appends to the image: /etc/scanbox, the daemon's state (outbox, identity
# cache, WSDL) and the journal. SD cards die of writes and of power cuts during writes; this way
# a power cut can only cost what the outbox had not yet committed (SQLite, synchronous=FULL).
[ "${SCANBOX_READONLY_ROOT:-0}" = "1" ] || exit 0

install -d "${ROOTFS_DIR}/data" "${ROOTFS_DIR}/usr/local/lib/scanbox"
cat files/fstab-data >> "${ROOTFS_DIR}/etc/fstab"
install -m 755 files/grow-data "${ROOTFS_DIR}/usr/local/lib/scanbox/grow-data"
install -m 755 files/enable-readonly-root "${ROOTFS_DIR}/usr/local/lib/scanbox/enable-readonly-root"
install -m 644 files/scanbox-grow-data.service "${ROOTFS_DIR}/etc/systemd/system/"
install -m 644 files/scanbox-readonly.service "${ROOTFS_DIR}/etc/systemd/system/"
