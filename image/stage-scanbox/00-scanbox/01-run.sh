#!/bin/bash -e
# Host side: put scanbox's files into the image. SCANBOX_SRC (this repository) and SCANBOX_DIST
# (the wheel) come from image/build.sh.
: "${SCANBOX_SRC:?run through image/build.sh}" "${SCANBOX_DIST:?run through image/build.sh}"

install -d "${ROOTFS_DIR}/opt/scanbox/dist" "${ROOTFS_DIR}/opt/scanbox/docs"
install -m 644 "${SCANBOX_DIST}"/scanbox-*.whl "${ROOTFS_DIR}/opt/scanbox/dist/"
install -m 644 "${SCANBOX_SRC}/docs/technician.md" "${ROOTFS_DIR}/opt/scanbox/docs/"

install -m 644 "${SCANBOX_SRC}/systemd/scanbox.service" "${ROOTFS_DIR}/etc/systemd/system/"
install -m 644 "${SCANBOX_SRC}/systemd/scanbox-provision.service" "${ROOTFS_DIR}/etc/systemd/system/"
install -m 644 "${SCANBOX_SRC}/systemd/70-scanbox.rules" "${ROOTFS_DIR}/etc/udev/rules.d/"

# the technician's starting point, on the partition a Windows PC can open
install -m 644 "${SCANBOX_SRC}/config/scanbox.example.toml" "${ROOTFS_DIR}/boot/firmware/scanbox.toml.example"
install -m 644 "${SCANBOX_SRC}/config/secrets.example.toml" "${ROOTFS_DIR}/boot/firmware/secrets.toml.example"

# the OLED's buses; the camera is detected by the firmware (camera_auto_detect=1, the default)
for line in dtparam=i2c_arm=on dtparam=spi=on; do
	grep -qx "${line}" "${ROOTFS_DIR}/boot/firmware/config.txt" || echo "${line}" >> "${ROOTFS_DIR}/boot/firmware/config.txt"
done
grep -qx i2c-dev "${ROOTFS_DIR}/etc/modules" || echo i2c-dev >> "${ROOTFS_DIR}/etc/modules"

# a small journal that survives reboots, for support (journalctl -u scanbox)
install -D -m 644 files/journald-scanbox.conf "${ROOTFS_DIR}/etc/systemd/journald.conf.d/scanbox.conf"
