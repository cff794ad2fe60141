#!/usr/bin/env bash
# Provider functions of cloud-boot on AWS; sourced, never run.
# Identity comes from IMDSv2 (instance tags in metadata); secrets from Secrets Manager; the
# member's EBS volume and network interface are found by their kcp-cluster/kcp-slot tags and
# attached here (the instance role may attach only those). Reads KCP_BOOT_AWS_REGION,
# KCP_BOOT_CLUSTER, KCP_BOOT_DISK, KCP_BOOT_VPC_CIDR and KCP_BOOT_MARKER (s3://bucket/key).

aws_imds() { # PATH under /latest/
  local token
  token=$(curl -fsS --retry 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)
  curl -fsS --retry 5 -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/$1"
}

aws_by_slot() { # describe-volumes|describe-network-interfaces SLOT QUERY
  aws ec2 "$1" --filters "Name=tag:kcp-cluster,Values=$KCP_BOOT_CLUSTER" "Name=tag:kcp-slot,Values=$2" \
    --query "$3" --output text
}

# attach_to_me KIND ID: attach a volume or interface once the previous (terminated) instance
# has let go of it; bounded, since the Auto Scaling group terminates the old instance first.
aws_attach_to_me() {
  local kind=$1 id=$2 me holder i
  me=$(aws_imds meta-data/instance-id)
  for ((i = 1; i <= 90; i++)); do
    if [[ $kind == volume ]]; then
      holder=$(aws ec2 describe-volumes --volume-ids "$id" --query 'Volumes[0].Attachments[0].InstanceId' --output text)
    else
      holder=$(aws ec2 describe-network-interfaces --network-interface-ids "$id" \
        --query 'NetworkInterfaces[0].Attachment.InstanceId' --output text)
    fi
    if [[ $holder == "$me" ]]; then return 0; fi
    if [[ $holder == None ]]; then
      if [[ $kind == volume ]]; then
        aws ec2 attach-volume --volume-id "$id" --instance-id "$me" --device /dev/sdf >/dev/null || true
      else
        aws ec2 attach-network-interface --network-interface-id "$id" --instance-id "$me" --device-index 1 >/dev/null || true
      fi
    else
      log "$id is still attached to $holder; waiting"
    fi
    sleep 10
  done
  die "cannot attach $kind $id"
}

aws_marker() { # bucket|key of KCP_BOOT_MARKER
  local path=${KCP_BOOT_MARKER#s3://}
  if [[ $1 == bucket ]]; then echo "${path%%/*}"; else echo "${path#*/}"; fi
}

# Ubuntu's AWS images carry snapd; the snap is the current AWS CLI v2 (S3 conditional writes,
# which the backup job's create-only daily marker needs), verified by snapd's signatures.
provider_prepare() {
  if ! command -v aws >/dev/null; then
    snap wait system seed.loaded
    snap install aws-cli --classic
  fi
  export AWS_DEFAULT_REGION=$KCP_BOOT_AWS_REGION
}

provider_slot() { aws_imds meta-data/tags/instance/kcp-slot; }

provider_secret() {
  aws secretsmanager get-secret-value --secret-id "$1" --query SecretString --output text
}

# persistent: the member's own EBS volume (tagged with its slot), re-attached to every
# replacement; local: the first instance-store NVMe disk, blank after every replacement.
provider_data_disk() {
  local volume dev
  if [[ $KCP_BOOT_DISK == local ]]; then
    for dev in /dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*; do
      if [[ -b $dev ]]; then echo "$dev"; return; fi
    done
    die "no instance-store disk found"
  fi
  volume=$(aws_by_slot describe-volumes "$1" 'Volumes[0].VolumeId')
  [[ $volume == vol-* ]] || die "no EBS volume tagged for slot $1"
  aws_attach_to_me volume "$volume" >&2
  echo "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${volume/-/}"
}

# etcd members: attach the slot's network interface (its fixed private address is what the
# certificates and peers name) and make it the source of traffic to the VPC, since etcd checks
# a peer's certificate against the connection's source address. Replies from the primary
# address keep leaving by the primary interface. Prints the primary address: the NLB sends
# to it (instance targets), and cloud-boot forwards it to the member address.
provider_network() {
  local eni address mac dev="" cidr gateway primary primary_dev i
  [[ " $KCP_BOOT_ROLES " == *" etcd "* ]] || return 0
  read -r eni address mac < <(aws_by_slot describe-network-interfaces "$1" \
    'NetworkInterfaces[0].[NetworkInterfaceId,PrivateIpAddress,MacAddress]')
  [[ $eni == eni-* ]] || die "no network interface tagged for slot $1"
  aws_attach_to_me interface "$eni" >&2
  for ((i = 1; i <= 60; i++)); do
    dev=$(ip -o link | awk -v mac="$mac" 'index($0, mac) {sub(":", "", $2); print $2; exit}')
    if [[ -n $dev ]]; then break; fi
    sleep 2
  done
  [[ -n $dev ]] || die "interface $eni ($mac) did not appear"
  cidr=$(aws_imds "meta-data/network/interfaces/macs/$mac/subnet-ipv4-cidr-block")
  gateway=$(awk -F'[./]' '{print $1"."$2"."$3"."$4+1}' <<<"$cidr")
  primary=$(aws_imds meta-data/local-ipv4)
  primary_dev=$(ip -o -4 addr show | awk -v a="$primary" 'index($4, a"/") == 1 {print $2; exit}')
  ip link set "$dev" up
  ip addr replace "$address/${cidr#*/}" dev "$dev"
  ip route replace default via "$gateway" dev "$primary_dev" table 100
  ip route replace "$cidr" dev "$dev" src "$address" table 101
  ip route replace "$KCP_BOOT_VPC_CIDR" via "$gateway" dev "$dev" src "$address" table 101
  ip rule del pref 100 2>/dev/null || true
  ip rule del pref 101 2>/dev/null || true
  ip rule add pref 100 from "$primary" lookup 100
  ip rule add pref 101 lookup 101
  echo "$primary"
}

provider_marker_exists() {
  local err
  if err=$(aws s3api head-object --bucket "$(aws_marker bucket)" --key "$(aws_marker key)" 2>&1 >/dev/null); then
    return 0
  fi
  if [[ $err == *"(404)"* || $err == *"Not Found"* ]]; then return 1; fi
  log "marker check failed: $err"
  return 2
}

provider_mark_formed() {
  local err body rc=0
  body=$(mktemp)
  printf 'formed\n' >"$body"
  err=$(aws s3api put-object --bucket "$(aws_marker bucket)" --key "$(aws_marker key)" \
    --if-none-match '*' --body "$body" 2>&1 >/dev/null) || rc=$?
  rm -f "$body"
  [[ $rc -eq 0 || $err == *PreconditionFailed* || $err == *"(412)"* ]] # 412: another member created it first
}
