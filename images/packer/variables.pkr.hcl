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

variable "envoy_version" {
  type        = string
  default     = "1.40.0"
  description = "Envoy release installed in the image. Keep its minor version equal to the go-control-plane/envoy API module in go.mod, so the data plane understands every field the control plane emits."

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.envoy_version))
    error_message = "The envoy_version must be a release number such as 1.40.0."
  }
}

variable "envoy_url" {
  type        = string
  default     = ""
  description = "Where the Envoy binary is downloaded from; empty means Envoy's official release asset for envoy_version and architecture. Point it at an internal mirror or an Istio proxy build as needed."
}

variable "envoy_sha256" {
  type        = string
  description = "SHA-256 of the Envoy binary at envoy_url (required: the build fails on a mismatch). Take it from the release's published checksums and pin it with envoy_version, e.g. in a .pkrvars.hcl file under review."

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.envoy_sha256))
    error_message = "The envoy_sha256 must be 64 lower-case hexadecimal digits."
  }
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
