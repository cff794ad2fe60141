#!/usr/bin/env bash
# Provider functions of cloud-boot on Google Compute Engine; sourced, never run.
# Identity and tokens come from the metadata server; secrets from Secret Manager (gcloud ships
# on Google's Debian images); the marker object through the GCS JSON API, so a missing object
# (404) is told apart from an error. Reads KCP_BOOT_GCE_PROJECT, KCP_BOOT_DISK,
# KCP_BOOT_MARKER (gs://bucket/object) and KCP_BOOT_LB_ADDRESSES from boot.env.

gce_metadata() { # PATH under computeMetadata/v1
  curl -fsS --retry 5 -H 'Metadata-Flavor: Google' "http://metadata.google.internal/computeMetadata/v1/$1"
}

gce_token() {
  gce_metadata instance/service-accounts/default/token | sed -E 's/.*"access_token" *: *"([^"]+)".*/\1/'
}

gce_marker_url() { # upload|object: the JSON API URL of the marker object
  local path=${KCP_BOOT_MARKER#gs://} bucket object
  bucket=${path%%/*}
  object=${path#*/}
  object=${object//\//%2F}
  if [[ $1 == upload ]]; then
    echo "https://storage.googleapis.com/upload/storage/v1/b/$bucket/o?uploadType=media&name=$object&ifGenerationMatch=0"
  else
    echo "https://storage.googleapis.com/storage/v1/b/$bucket/o/$object"
  fi
}

provider_prepare() {
  command -v gcloud >/dev/null || die "gcloud is missing: use a Google-provided Debian or Ubuntu image"
}

# The slot is set per instance (etcd: the per-instance config of its group) or per template (API servers).
provider_slot() { gce_metadata instance/attributes/kcp-slot; }

provider_secret() {
  gcloud secrets versions access latest --secret="$1" --project="$KCP_BOOT_GCE_PROJECT" --quiet
}

# persistent: the stateful disk the group re-attaches under device name etcd-data;
# local: the first local SSD (NVMe or SCSI), blank after every replacement.
provider_data_disk() {
  local dev
  if [[ $KCP_BOOT_DISK == persistent ]]; then
    echo /dev/disk/by-id/google-etcd-data
    return
  fi
  for dev in /dev/disk/by-id/google-local-nvme-ssd-0 /dev/disk/by-id/google-local-ssd-0; do
    if [[ -b $dev ]]; then echo "$dev"; return; fi
  done
  die "no local SSD found"
}

# The group gives this VM its reserved internal address as its primary one, so nothing to
# attach; passthrough load balancers deliver to their own address, which must be forwarded.
provider_network() {
  local address
  for address in ${KCP_BOOT_LB_ADDRESSES:-}; do echo "$address"; done
}

provider_marker_exists() {
  local code
  code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(gce_token)" "$(gce_marker_url object)") || return 2
  case $code in
    200) return 0 ;;
    404) return 1 ;;
    *) log "marker check answered HTTP $code"; return 2 ;;
  esac
}

provider_mark_formed() {
  local code
  code=$(printf 'formed\n' | curl -sS -o /dev/null -w '%{http_code}' -X POST --data-binary @- \
    -H "Authorization: Bearer $(gce_token)" -H 'Content-Type: text/plain' "$(gce_marker_url upload)") || return 1
  [[ $code == 200 || $code == 412 ]] # 412: another member created it first
}
