#!/usr/bin/env bash
# System packages the tests need: Orthanc with its DICOMweb plugin and Chromium for the DICOMweb/OHIF tests
# (tests/server/test_dicomweb.py); DICOM's validator dciodvfy (dicom3tools) and plastimatch, the independent RT Structure Set
# reader, for tests/data/test_rtstruct.py. Installed when missing and this is root with apt; otherwise those tests skip
# with a reason (and fail under MEDLSAM_REQUIRE_DICOMWEB=1, as .ci/run sets).
set -euo pipefail
missing=()
command -v Orthanc >/dev/null || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v chromium >/dev/null || missing+=(chromium)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v plastimatch >/dev/null || missing+=(plastimatch)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing ${missing[*]} (apt) for the DICOMweb and RT Structure Set tests"
  start=$(date +%s)
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  echo "Installed in $(( $(date +%s) - start )) s."
else
  echo "note: ${missing[*]} missing and this is not root with apt: the DICOMweb / RT Structure Set tests will skip" >&2
fi
