#!/usr/bin/env bash
# System packages the DICOMweb tests need (tests/test_dicomweb.py): Orthanc with its DICOMweb plugin, and Chromium
# for the OHIF browser test. Installed when missing and this is root with apt; otherwise those tests skip with a
# reason (and fail under MEDLSAM_REQUIRE_DICOMWEB=1, as .ci/run sets).
set -euo pipefail
missing=()
command -v Orthanc >/dev/null || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing ${missing[*]} (apt) for the DICOMweb tests"
  start=$(date +%s)
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  echo "Installed in $(( $(date +%s) - start )) s."
else
  echo "note: ${missing[*]} missing and this is not root with apt: the DICOMweb tests will skip" >&2
fi
