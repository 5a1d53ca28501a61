#!/usr/bin/env bash
# Installs what the real-guest tests need: Debian packages for QEMU, busybox, fio, and a guest
# kernel with its virtio modules extracted into .cache/guest/kernel/. Idempotent: it touches the
# network only when something is missing.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kdir=${GUEST_CACHE:-$root/.cache/guest}/kernel
export DEBIAN_FRONTEND=noninteractive
sudo=()
((EUID == 0)) || sudo=(sudo)

# qemu-system-x86 pulls in qemu-system-common, which ships qemu-storage-daemon (BACKEND=qsd).
# xz-utils/zstd: newer Debian kernels compress modules and busybox insmod can't read them.
# systemd: systemd-analyze (unit checks) and systemd-socket-activate (activation tests);
# systemd-container: systemd-nspawn (scripts/systemd-e2e.sh); strace: the unit's system call
# filter test; util-linux: unshare, nsenter, setpriv; xfsprogs: the XFS extent-size-hint test.
pkgs=(qemu-system-x86 busybox-static cpio fio diffutils xz-utils zstd systemd systemd-container
    strace util-linux xfsprogs)
updated=
apt_update() { [[ -n $updated ]] || { "${sudo[@]}" apt-get update -q; updated=1; }; }

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps: installing ${missing[*]}"
    apt_update
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[[ -f $kdir/vmlinuz && -f $kdir/modules/order ]] && exit 0

# The cloud flavour boots fast (few drivers); its virtio drivers are modules, loaded by our /init.
apt_update
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
[[ -n $kpkg ]] || { echo "install-deps: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
kver=${kpkg#linux-image-}
echo "install-deps: fetching guest kernel $kver"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# _apt must be able to write there, or apt-get downloads as root with a warning.
chown _apt "$tmp" 2>/dev/null || true
(cd "$tmp" && { apt-get download -q "$kpkg-unsigned" || apt-get download -q "$kpkg"; })
dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/x"
mdir=$tmp/x/lib/modules/$kver
new=$tmp/kernel
mkdir -p "$new/modules"
cp "$tmp/x/boot/vmlinuz-$kver" "$new/vmlinuz"
echo "$kver" >"$new/version"

# Load order of virtio_pci + virtio_blk and their dependencies, read from each module's
# "depends=" modinfo string (the deb ships no modules.dep; kmod may not be installed).
# Built-in ones (modules.builtin) are skipped.
declare -A seen=()
order=()
add_mod() {
    local name=$1 ko dep deps
    [[ -n ${seen[$name]:-} ]] && return
    seen[$name]=1
    ko=$(find "$mdir/kernel" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) -print -quit)
    if [[ -z $ko ]]; then
        grep -qE "/($name|${name//_/-})\.ko$" "$mdir/modules.builtin" && return
        echo "install-deps: module $name not found in $kver" >&2
        exit 1
    fi
    case $ko in
    *.ko) cp "$ko" "$new/modules/$name.ko" ;;
    *.ko.xz) xz -dc "$ko" >"$new/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$ko" >"$new/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$ko" >"$new/modules/$name.ko" ;;
    *) echo "install-deps: unknown module format $ko" >&2 && exit 1 ;;
    esac
    IFS=, read -ra deps < <(tr '\0' '\n' <"$new/modules/$name.ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in "${deps[@]}"; do add_mod "$dep"; done
    order+=("$name") # after its dependencies
}
add_mod virtio_pci
add_mod virtio_blk
printf '%s\n' "${order[@]}" >"$new/modules/order"

rm -rf "$kdir"
mkdir -p "$(dirname "$kdir")"
mv "$new" "$kdir"
echo "install-deps: guest kernel $kver, modules: ${order[*]}"
