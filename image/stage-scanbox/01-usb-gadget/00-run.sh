#!/bin/bash -e
# Optional (SCANBOX_USB_GADGET=1): the box is also a USB Ethernet adapter, for a box plugged into
# the counter PC: the PC gets an address by DHCP and reaches the HIS API at 192.168.7.1. The
# Pi's OTG port (Pi 4: USB-C, which also powers it; Zero: the "USB" port) is the one to use.
[ "${SCANBOX_USB_GADGET:-0}" = "1" ] || exit 0

config="${ROOTFS_DIR}/boot/firmware/config.txt"
cmdline="${ROOTFS_DIR}/boot/firmware/cmdline.txt"
grep -q '^dtoverlay=dwc2' "${config}" || printf '[all]\ndtoverlay=dwc2,dr_mode=peripheral\n' >> "${config}"
grep -q 'modules-load=dwc2,g_ether' "${cmdline}" || sed -i '1 s/$/ modules-load=dwc2,g_ether/' "${cmdline}"
# fixed addresses: without them the PC sees a new network adapter at every boot
install -m 644 files/g_ether.conf "${ROOTFS_DIR}/etc/modprobe.d/scanbox-g_ether.conf"
install -m 600 files/scanbox-usb0.nmconnection "${ROOTFS_DIR}/etc/NetworkManager/system-connections/"
