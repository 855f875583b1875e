#!/usr/bin/env bash
# Makes the GnuPG test vectors in this folder: Ed25519 certificates, third-party certifications
# made by `gpg --quick-sign-key`, a revoked certification, a revoked key and a detached transcript
# signature. Every gpg call runs at a frozen time (--faked-system-time), in a throw-away
# GNUPGHOME, without a passphrase. Made with gpg (GnuPG) 2.2.40; re-running it makes new keys,
# so tests/test_weboftrust_interop.py reads the fingerprints from the files, never from this script.
#
# Usage: tests/vectors/openpgp/make_gpg.sh   (writes into the folder it lives in)
set -euo pipefail
out="$(cd "$(dirname "$0")" && pwd)/gpg"
mkdir -p "$out"
GNUPGHOME="$(mktemp -d)"
export GNUPGHOME
trap 'gpgconf --kill all >/dev/null 2>&1 || true; rm -rf "$GNUPGHOME"' EXIT

T0=20260101T000000     # keys and certifications
T1=20260101T010000     # the revocations, one hour later
g() { gpg --batch --quiet --pinentry-mode loopback --passphrase '' --faked-system-time "$1!" "${@:2}"; }
fpr() { gpg --batch --with-colons --list-keys "=$1" | awk -F: '$1 == "fpr" { print $10; exit }'; }
newkey() { g "$T0" --quick-gen-key "$1" ed25519 sign,cert never; fpr "$1"; }

INTRO1=$(newkey "qkdnode introducer one")
INTRO2=$(newkey "qkdnode introducer two")
STRANGER=$(newkey "qkdnode stranger")
BOB=$(newkey "qkdnode node bob")                  # vouched for by introducers one and two
CAROL=$(newkey "qkdnode node carol")              # vouched for by one, certification expires after 1 day
DAVE=$(newkey "qkdnode node dave")                # vouched for by one, certification then revoked
ERIN=$(newkey "qkdnode node erin")                # vouched for by the stranger only
FRANK=$(newkey "qkdnode node frank")              # one vouched for "qkdnode node frank-old" only
GRACE=$(newkey "qkdnode node grace")              # vouched for by one, then the key revoked
g "$T0" --quick-add-uid "$FRANK" "qkdnode node frank-old"

g "$T0" -u "$INTRO1" --quick-sign-key "$BOB"
g "$T0" -u "$INTRO2" --quick-sign-key "$BOB"
g "$T0" -u "$INTRO1" --default-cert-expire 1d --quick-sign-key "$CAROL"
g "$T0" -u "$INTRO1" --quick-sign-key "$DAVE"
g "$T1" --quick-revoke-sig "$DAVE" "$INTRO1"
g "$T0" -u "$STRANGER" --quick-sign-key "$ERIN"
g "$T0" -u "$INTRO1" --quick-sign-key "$FRANK" "qkdnode node frank-old"
g "$T0" -u "$INTRO1" --quick-sign-key "$GRACE"
# gpg made a revocation certificate for every key; import GRACE's, with its guard colon removed
sed 's/^:-----BEGIN/-----BEGIN/' "$GNUPGHOME/openpgp-revocs.d/$GRACE.rev" > "$GNUPGHOME/grace.rev"
g "$T1" --import "$GNUPGHOME/grace.rev"

for name in INTRO1 INTRO2 STRANGER BOB CAROL DAVE ERIN FRANK GRACE; do
    file=$(echo "$name" | tr '[:upper:]' '[:lower:]')
    g "$T0" --armor --export "${!name}" > "$out/$file.asc"
done
printf 'qkdnode handshake transcript vector\n' > "$out/transcript.bin"
g "$T0" -u "$BOB" --detach-sign --output "$out/transcript.bin.sig" "$out/transcript.bin"
gpg --version | head -1 > "$out/VERSION"
