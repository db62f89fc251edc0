#!/bin/bash -e
# In the image: the service user, the venv, the units.

# the groups the daemon's devices need; Raspberry Pi OS has them, a plain Debian may not
for group in dialout input i2c spi gpio video; do
	getent group "${group}" > /dev/null || groupadd --system "${group}"
done
getent group scanbox > /dev/null || groupadd --system scanbox
# HID scanners' own group (70-scanbox.rules): the daemon is not in `input`, which reads every keyboard
getent group scanbox-scanner > /dev/null || groupadd --system scanbox-scanner
id scanbox > /dev/null 2>&1 || useradd --system --gid scanbox --home-dir /var/lib/scanbox --no-create-home \
	--shell /usr/sbin/nologin --comment "scanbox daemon" scanbox
usermod --append --groups dialout,scanbox-scanner,i2c,spi,gpio,video scanbox

# picamera2 and libcamera are Raspberry Pi OS packages: the venv sees the system's site-packages
python3 -m venv --system-site-packages /opt/scanbox/venv
/opt/scanbox/venv/bin/pip install --no-cache-dir --disable-pip-version-check /opt/scanbox/dist/scanbox-*.whl
/opt/scanbox/venv/bin/scanbox --version
ln -sf /opt/scanbox/venv/bin/scanbox /usr/local/bin/scanbox

install -d -m 755 /etc/scanbox
systemctl enable scanbox-provision.service scanbox.service
