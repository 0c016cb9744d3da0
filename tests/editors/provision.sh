#!/usr/bin/env bash
# Installs what the editor tests (tests/test_krita.py, tests/test_gimp.py) need on a Debian 12
# CI machine, as root. Idempotent: a second run on the same machine only checks and returns.
#
#   Krita 5 + Xvfb: Debian 12 packages (apt).
#   GIMP 3: Debian 12 has only GIMP 2.10, which has no Python 3 plug-ins, so GIMP 3 lives in a
#   Debian 13 "trixie" chroot cached under $GENFILL_GIMP_CHROOT, reused across runs.
#
# Environment:
#   GENFILL_GIMP_CHROOT  where the chroot lives (default /var/cache/genfill-ci/gimp-trixie)
#   GENFILL_DEBIAN_MIRROR  (default http://deb.debian.org/debian)
#   GENFILL_SKIP_KRITA=1, GENFILL_SKIP_GIMP=1  provision only one editor
set -euo pipefail

CHROOT=${GENFILL_GIMP_CHROOT:-/var/cache/genfill-ci/gimp-trixie}
MIRROR=${GENFILL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bump when the package list below changes: a chroot with another stamp is rebuilt.
STAMP="genfill-gimp-chroot v1: gimp gir1.2-gimp-3.0 python3-gi"
# xdotool presses the GIMP dialog's buttons and ImageMagick's import takes the screenshots in
# the editor window tests.
KRITA_PACKAGES=(krita python3-pyqt5 python3-sip xvfb xauth xdotool imagemagick)

log() { printf 'provision: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (apt-get, debootstrap, chroot)"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing_packages() {
    local package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || echo "$package"
    done
}

# One provisioning at a time per machine: two CI jobs must not build the same chroot.
mkdir -p "$(dirname "$CHROOT")"
exec 9>"$(dirname "$CHROOT")/.provision.lock"
flock 9

started=$(date +%s)

if [ "${GENFILL_SKIP_KRITA:-0}" != 1 ]; then
    mapfile -t missing < <(missing_packages "${KRITA_PACKAGES[@]}")
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        apt_install "${missing[@]}"
    else
        log "krita and xvfb already installed"
    fi
fi

if [ "${GENFILL_SKIP_GIMP:-0}" != 1 ]; then
    if [ -f "$CHROOT/.genfill-stamp" ] && [ "$(cat "$CHROOT/.genfill-stamp")" = "$STAMP" ] \
        && [ -x "$CHROOT/usr/bin/gimp-console-3.0" ]; then
        log "GIMP 3 chroot ready at $CHROOT"
    else
        mapfile -t missing < <(missing_packages debootstrap)
        [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
        building="$CHROOT.building"
        if mountpoint -q "$building/proc" 2>/dev/null; then umount "$building/proc"; fi
        rm -rf "$building"
        log "building the trixie chroot at $building"
        debootstrap --variant=minbase trixie "$building" "$MIRROR" >/dev/null
        cp /etc/resolv.conf "$building/etc/resolv.conf"
        mount -t proc proc "$building/proc"
        trap 'umount "$building/proc" 2>/dev/null || true' EXIT
        chroot "$building" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        chroot "$building" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends gimp gir1.2-gimp-3.0 python3-gi >/dev/null
        chroot "$building" apt-get clean
        umount "$building/proc"
        trap - EXIT
        echo "$STAMP" >"$building/.genfill-stamp"
        if [ -d "$CHROOT" ]; then
            if mountpoint -q "$CHROOT/proc" 2>/dev/null; then umount "$CHROOT/proc"; fi
            rm -rf "$CHROOT"
        fi
        mv "$building" "$CHROOT"
        log "GIMP 3 chroot built at $CHROOT"
    fi
fi

log "done in $(( $(date +%s) - started )) s"
