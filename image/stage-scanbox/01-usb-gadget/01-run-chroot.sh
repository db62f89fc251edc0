#!/bin/bash -e
# NetworkManager's "shared" method answers the PC's DHCP with dnsmasq
[ "${SCANBOX_USB_GADGET:-0}" = "1" ] || exit 0
apt-get install -y --no-install-recommends dnsmasq-base
