#!/usr/bin/env bash
# Makes the Sequoia (sq) test vectors in this folder: an introducer and a node key made by
# `sq key generate`, certifications made by `sq certify` (one expiring after a day, one partial
# with trust amount 60, one of the gpg-made node certificate gpg/bob.asc) and a detached
# transcript signature by `sq sign`. Every call is dated 2026-01-01 (--creation-time / --time).
# Made with sq 0.27.0 (Debian package `sq`, sequoia-openpgp 1.12.0); the secret keys stay in a
# temporary folder. Re-running it makes new keys: the tests read fingerprints from the files.
#
# Usage: tests/vectors/openpgp/make_sq.sh   (needs gpg/bob.asc from make_gpg.sh)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/sq"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

T0=20260101T000000Z
newkey() {  # USERID NAME: secret key in $work/NAME.key, certificate in $out/NAME.asc
    sq key generate --creation-time "$T0" --expires never --cipher-suite cv25519 \
        --userid "$1" --export "$work/$2.key"
    sq key extract-cert --output "$out/$2.asc" "$work/$2.key"
}
newkey "qkdnode introducer sq" intro
newkey "qkdnode node bob" bob

sq certify --time "$T0" --expires-in 1d --output "$out/bob.certified.asc" \
    "$work/intro.key" "$out/bob.asc" "qkdnode node bob"
sq certify --time "$T0" --amount 60 --output "$out/bob.partial.asc" \
    "$work/intro.key" "$out/bob.asc" "qkdnode node bob"
sq certify --time "$T0" --expires never --output "$out/gpg-bob.certified.asc" \
    "$work/intro.key" "$here/gpg/bob.asc" "qkdnode node bob"
printf 'qkdnode handshake transcript vector\n' > "$out/transcript.bin"
sq sign --detached --time "$T0" --signer-key "$work/bob.key" --output "$out/transcript.bin.sig" \
    "$out/transcript.bin"
sq --version > "$out/VERSION"
